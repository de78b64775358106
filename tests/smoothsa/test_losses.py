import math

import pytest
import torch
import torch.nn.functional as F

from smoothsa.losses import preheat_loss, recognition_losses, reconstruction_loss, slot_contrast_loss


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_reconstruction_loss_value_and_stopgrad():
    recon = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    feature = torch.tensor([[0.0, 2.5], [1.0, 1.0]], requires_grad=True)
    loss = reconstruction_loss(recon, feature)
    # (1 + 0.25 + 4 + 4) / 4
    assert loss.item() == pytest.approx(9.25 / 4)
    loss.backward()
    torch.testing.assert_close(recon.grad, 2 * (recon - feature).detach() / 4)
    assert feature.grad is None  # the target is the frozen backbone output


def test_reconstruction_loss_rejects_broadcasting():
    with pytest.raises(ValueError):
        reconstruction_loss(torch.zeros(2, 3), torch.zeros(3))


def test_preheat_loss_value_and_stopgrad():
    g = _generator(0)
    qinit = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    slots = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    loss = preheat_loss(qinit, slots)
    expected = sum((q - s) ** 2 for q, s in zip(qinit.flatten().tolist(), slots.flatten().tolist())) / 30
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert slots.grad is None and qinit.grad is not None


def test_slot_contrast_hand_computed():
    # B=1, S=2, T=2. Frame 0: e1, e2; frame 1: 3·e1 (normalised away), (1, 1).
    slots = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [1.0, 1.0]]]], dtype=torch.float64)
    # slot 0 of frame 1: logits over frame-0 slots (10, 0), target 0 -> log(1 + e^-10);
    # slot 1: logits (7.07, 7.07), target 1 -> log 2.
    expected = (math.log1p(math.exp(-10.0)) + math.log(2.0)) / 2
    assert slot_contrast_loss(slots, tau=0.1).item() == pytest.approx(expected, rel=1e-12)
    # tau only scales the logits: with tau=1 slot 0 gives log(1 + e^-1).
    expected_tau1 = (math.log1p(math.exp(-1.0)) + math.log(2.0)) / 2
    assert slot_contrast_loss(slots, tau=1.0).item() == pytest.approx(expected_tau1, rel=1e-12)


def _slot_contrast_loop(slots: torch.Tensor, tau: float) -> torch.Tensor:
    """Independent formulation: explicit loops over frame pairs and target slots, slot-major index."""
    batch, frames, num_slots, _ = slots.shape
    unit = slots / slots.norm(dim=-1, keepdim=True)
    terms = []
    for t in range(frames - 1):
        source = [unit[b, t, s] for s in range(num_slots) for b in range(batch)]  # m = s·B + b
        target = [unit[b, t + 1, s] for s in range(num_slots) for b in range(batch)]
        for m_prime, query in enumerate(target):
            logits = torch.stack([src @ query for src in source]) / tau
            terms.append(torch.logsumexp(logits, 0) - logits[m_prime])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("shape", [(1, 2, 1, 3), (2, 3, 4, 8), (3, 4, 7, 5)])
def test_slot_contrast_matches_loop_and_official_form(shape):
    slots = torch.randn(*shape, generator=_generator(1), dtype=torch.float64)
    ours = slot_contrast_loss(slots)
    torch.testing.assert_close(ours, _slot_contrast_loop(slots, 0.1), rtol=1e-12, atol=1e-12)
    # The official form: probability target eye(S·B) with class axis 1.
    batch, frames, num_slots, _ = shape
    unit = F.normalize(slots, dim=-1).permute(1, 2, 0, 3).flatten(1, 2)  # (T, S·B, D)
    similarity = torch.einsum("tmc,tnc->tmn", unit[:-1], unit[1:]) / 0.1
    eye = torch.eye(num_slots * batch, dtype=slots.dtype).expand(frames - 1, -1, -1)
    torch.testing.assert_close(ours, F.cross_entropy(similarity, eye), rtol=1e-12, atol=1e-12)


def test_slot_contrast_softmax_runs_over_the_source_frame():
    # Distinguishes the class axis: with the softmax over target-frame slots instead, the value changes.
    slots = torch.randn(2, 2, 3, 4, generator=_generator(2), dtype=torch.float64)
    unit = F.normalize(slots, dim=-1).permute(1, 2, 0, 3).flatten(1, 2)
    similarity = (unit[0] @ unit[1].T) / 0.1  # (m, m')
    wrong_axis = F.cross_entropy(similarity, torch.arange(6))  # softmax over m' for each m
    right_axis = F.cross_entropy(similarity.T, torch.arange(6))  # softmax over m for each m'
    assert not torch.isclose(wrong_axis, right_axis)
    torch.testing.assert_close(slot_contrast_loss(slots), right_axis, rtol=1e-12, atol=1e-12)


def test_slot_contrast_gradient_reaches_every_frame():
    slots = torch.randn(2, 3, 4, 8, generator=_generator(3), requires_grad=True)
    slot_contrast_loss(slots).backward()
    per_frame = slots.grad.abs().sum(dim=(0, 2, 3))  # (T,)
    assert (per_frame > 0).all()
    # Gradient check in float64 against finite differences.
    slots64 = torch.randn(2, 3, 2, 4, generator=_generator(4), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(slot_contrast_loss, (slots64,))


def test_slot_contrast_needs_two_frames():
    with pytest.raises(ValueError):
        slot_contrast_loss(torch.randn(2, 1, 3, 4))


def test_recognition_losses_values():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], requires_grad=True)
    target = torch.tensor([0, 1], dtype=torch.uint8)  # uint8 targets are accepted
    box_pred = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 2.0, 1.0]])
    box_target = torch.tensor([[0.0, 0.5, 1.0, 2.0], [0.5, 0.0, 1.0, 1.0]])
    ce, l1 = recognition_losses(logits, target, box_pred, box_target)
    ce0 = -2.0 + math.log(math.exp(2.0) + 1.0 + math.exp(-1.0))
    ce1 = -0.5 + math.log(2 * math.exp(0.5) + math.exp(3.0))
    assert ce.item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    assert l1.item() == pytest.approx((0.5 + 1.0 + 0.5 + 1.0) / 8, rel=1e-6)
    ce.backward()
    assert logits.grad is not None


def test_recognition_losses_no_match_is_invalid():
    assert recognition_losses(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0, 4),
                              torch.zeros(0, 4)) is None

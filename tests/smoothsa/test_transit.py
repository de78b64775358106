"""RSFQTransit: the eval path of docs/official.md §9 and the training-time random gaps of §2.7."""
import itertools

import pytest
import torch

from smoothsa.transit import RSFQTransit


def _transit(pdo=0.0):
    torch.manual_seed(0)
    transit = RSFQTransit(dt=6, pdo=pdo).double()
    with torch.no_grad():
        for p in transit.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
    return transit


def _inputs(b=2, past=3):
    g = torch.Generator().manual_seed(1)
    slots = torch.randn(b, past, 4, 256, generator=g, dtype=torch.double)
    encodes = torch.randn(b, past + 1, 16, 384, generator=g, dtype=torch.double)
    return slots, encodes


def test_eval_bridges_one_frame():
    transit = _transit().eval()
    slots, encodes = _inputs()
    expected = transit.transit(slots[:, -1] + transit.te.weight[1], transit.proji(encodes[:, -1]) + transit.te.weight[0])[0]
    torch.testing.assert_close(transit(slots, encodes), expected)


def test_training_draws_every_allowed_gap():
    transit = _transit().train()
    slots, encodes = _inputs(past=3)
    i = 3
    candidates = {}
    for ts, tf in itertools.product(range(i), range(1, i + 1)):
        x = slots[:, ts] + transit.te.weight[i - ts]
        memory = transit.proji(encodes[:, tf]) + transit.te.weight[i - tf]
        candidates[(ts, tf)] = transit.transit(x, memory)[0]
    seen = set()
    torch.manual_seed(0)
    for _ in range(80):
        out = transit(slots, encodes)
        for b in range(2):
            hits = [key for key, c in candidates.items() if torch.allclose(out[b], c[b])]
            assert len(hits) == 1
            seen.add((b, hits[0]))
    assert {key for b, key in seen if b == 0} == set(candidates)  # all 9 (ts, tf) pairs occur


def test_window_keeps_the_last_dt_frames():
    transit = _transit().train()
    slots, encodes = _inputs(past=9)
    torch.manual_seed(7)
    full = transit(slots, encodes)
    torch.manual_seed(7)
    windowed = transit(slots[:, -5:], encodes[:, -6:])
    torch.testing.assert_close(full, windowed)


def test_inputs_are_detached():
    transit = _transit().eval()
    slots, encodes = _inputs()
    slots.requires_grad_()
    encodes.requires_grad_()
    transit(slots, encodes).sum().backward()
    assert slots.grad is None and encodes.grad is None
    assert transit.proji.weight.grad is not None and transit.te.weight.grad[:2].abs().sum() > 0


def test_rejects_mismatched_frames():
    with pytest.raises(ValueError, match="Tp\\+1"):
        _transit()(*_inputs(past=3)[:1], torch.randn(2, 3, 16, 384, dtype=torch.double))

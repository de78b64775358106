"""SPOT distillation (`spot_r_distill-coco`, docs/official.md §2.9b): the official key layout, the freezing
rules, the attention-matching loss by hand, initialisation from a SPOT checkpoint, and a few training steps."""
import math

import pytest
import torch

import smoothsa
from smoothsa.distill import attention_match_loss, init_distill_from_spot
from smoothsa.initializers import NormalSeparat, NormalShared
from smoothsa.losses import reconstruction_loss
from smoothsa.presets import apply_overrides, get_preset
from smoothsa.tasks import Spot, SpotDistill

NAME = "spot_r_distill-coco"
# A SPOT small enough for CPU training steps: the fixed patch projection stands in for DINOv2.
TINY = [
    "model.backbone=patch", "model.image_size=32", "model.grid=4", "model.feature_dim=32", "model.slot_dim=32",
    "model.decoder_layers=1", "model.fused=false",
]


def tiny(name: str):
    return smoothsa.build_model(apply_overrides(get_preset(name), TINY).model)


def _randomise(model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def full():
    """The full model, DINOv2 backbones included."""
    return smoothsa.build_model(NAME)


def _backbone_count() -> int:
    # cls_token, reg_token, pos_embed, patch_embed.proj.{weight,bias}; 14 tensors in each of 12 blocks; no norm.
    return 5 + 12 * 14


@pytest.mark.parametrize("backbone", [True, False], ids=["backbone", "features"])
def test_keys_order_and_shapes_follow_the_official_rules(full, backbone):
    # The rules: `m.teacher.` + the spot_r-coco keys (checked against the official list in test_presets.py); then
    # `m.student.` + the same keys, with the frozen copy's keys `encode_backbone2.*` right after `encode_backbone.*`
    # (the official SPOT registers it second) and NormalSeparat's per-slot mean (1, S, 256).
    spot_model = smoothsa.build_model("spot_r-coco", backbone=backbone)
    spot = {k: tuple(v.shape) for k, v in smoothsa.official_state_dict(spot_model).items()}
    spot_backbone = {k: v for k, v in spot.items() if k.startswith("m.encode_backbone.")}
    rest = {k: v for k, v in spot.items() if k not in spot_backbone}
    expected = {"m.teacher." + k[2:]: v for k, v in spot.items()}
    expected |= {"m.student." + k[2:]: v for k, v in spot_backbone.items()}
    expected |= {"m.student.encode_backbone2." + k[len("m.encode_backbone."):]: v for k, v in spot_backbone.items()}
    expected |= {"m.student." + k[2:]: v for k, v in rest.items()}
    expected["m.student.initializ.mean"] = (1, 7, 256)

    model = full if backbone else smoothsa.build_model(NAME, backbone=False)
    ours = {k: tuple(v.shape) for k, v in smoothsa.official_state_dict(model).items()}
    assert list(ours.items()) == list(expected.items())
    assert len(spot_backbone) == (_backbone_count() if backbone else 0) and len(rest) == 68
    assert len(ours) == (2 * (_backbone_count() + 68) + _backbone_count() if backbone else 2 * 68)
    if backbone:
        assert len(ours) == 655


def test_the_student_and_teacher_differ_where_the_official_config_says():
    model = smoothsa.build_model(NAME, backbone=False)
    assert isinstance(model.teacher.initializ, NormalShared) and isinstance(model.student.initializ, NormalSeparat)
    assert model.teacher.aggregat.trunc_bp is None and model.student.aggregat.trunc_bp == "bi-level"
    assert not model.teacher.finetune and model.student.finetune
    torch.testing.assert_close(model.student.initializ.logstd, torch.full((1, 1, 256), math.log(256**-0.5)))
    assert model.teacher.decode.bos.shape == model.student.decode.bos.shape == (9, 1, 1, 384)


def test_preset_has_the_official_hyperparameters():
    preset = get_preset(NAME)
    optim, data, config = preset.optim, preset.data, preset.model
    assert (optim.total_steps, optim.batch_size, optim.val_batch_size, optim.lr) == (100_000, 32, 32, 2e-4)
    assert (optim.clip_norm, optim.clip_type, optim.loss_weights) == (0.3, "inf", {"recon": 1.0, "match": 0.005})
    assert (data.dataset, data.coco_mode) == ("coco", "instance")
    assert (config.arch, config.discovery, config.num_slots) == ("spot_distill", "spot_r-coco", 7)
    assert (config.initializer, config.trunc_bp, config.decoder) == ("separat", "bi-level", "ar9")


def _trainable(name: str) -> bool:
    if name.startswith("teacher.") or name.startswith("student.encode_backbone2."):
        return False
    if name.startswith("student.encode_backbone."):
        return any(name.startswith(f"student.encode_backbone.1.blocks.{i}.") for i in (8, 9, 10, 11))
    return True


def test_only_blocks_8_to_11_and_the_student_heads_train(full):
    names = [n for n, _ in full.named_parameters()]
    trainable = {n for n, p in full.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if _trainable(n)}
    assert len(trainable) == 4 * 14 + 68  # four DINOv2 blocks and every non-backbone student tensor

    full.train()
    assert not full.teacher.training and full.student.training  # the teacher stays in eval mode
    task = SpotDistill(get_preset(NAME))
    full.zero_grad(set_to_none=True)
    out = full(torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)))
    sum(task.losses(out, {}).values()).backward()
    with_grad = {n for n, p in full.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable
    full.zero_grad(set_to_none=True)


def test_other_spot_presets_keep_the_backbone_detached():
    model = smoothsa.build_model("spot_r-coco").train()
    model.encode_backbone[1].blocks[11].requires_grad_(True)  # even unfrozen, no gradient reaches it
    out = model(torch.randn(1, 3, 256, 256))
    reconstruction_loss(out.recon, out.feature).backward()
    assert all(p.grad is None for p in model.encode_backbone.parameters())
    assert not hasattr(model, "encode_backbone2")


def test_the_student_reads_its_backbone_and_reconstructs_the_frozen_copy():
    student = _randomise(tiny(NAME)).student.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = student(x)
        student.encode_backbone.proj.weight.mul_(2.0)  # the backbone changes, its frozen copy does not
        after = student(x)
        target = student.encode_backbone2(x)
    assert torch.equal(before.feature, target) and torch.equal(after.feature, target)
    assert not torch.allclose(before.slots, after.slots)


def _attention(owner: list[int], slots: int, seed: int) -> torch.Tensor:
    """(S, N) values in [0, 1.5) whose largest entry in column n is at row owner[n]."""
    values = torch.rand(slots, len(owner), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.5
    values[owner, range(len(owner))] += 1.0
    return values


def test_match_loss_equals_a_hand_computed_value():
    # Image 0 (tokens on a 2×4 grid). Student segments s0 = {0,1,2,3}, s1 = {4,5}, s2 = {6,7}; teacher segments
    # t2 = {0,1}, t0 = {2,3,4}, t1 = {5,6,7}. IoU: (s0,t2) 2/4, (s0,t0) 2/5, (s1,t0) 1/4, (s1,t1) 1/4, (s2,t1) 2/3,
    # all others 0. t0's best student is s0, which t2 wants too; the Hungarian matching maximising the IoU sum
    # pairs s0-t2, s1-t0, s2-t1 (1.417 against 1.067 for the next best), so the targets are 0,0,1,1,1,2,2,2.
    # Image 1: the teacher's segments are the student's under other labels: t1 = s0, t2 = s1, t0 = s2.
    owners = [
        ([0, 0, 0, 0, 1, 1, 2, 2], [2, 2, 0, 0, 0, 1, 1, 1]),  # (student, teacher) owner of each token
        ([0, 0, 0, 0, 1, 1, 2, 2], [1, 1, 1, 1, 2, 2, 0, 0]),
    ]
    targets = [[0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 1, 2, 2]]
    student = torch.stack([_attention(s, 3, 2 * i) for i, (s, _) in enumerate(owners)]).view(2, 3, 2, 4)
    teacher = torch.stack([_attention(t, 3, 2 * i + 1) for i, (_, t) in enumerate(owners)]).view(2, 3, 2, 4)

    logits = student.view(2, 3, 8).tolist()
    expected, grad = 0.0, torch.zeros(2, 3, 8, dtype=torch.float64)
    for b in range(2):
        for n in range(8):
            column = [logits[b][c][n] for c in range(3)]
            norm = sum(math.exp(z) for z in column)
            expected += math.log(norm) - column[targets[b][n]]
            for c in range(3):
                grad[b, c, n] = (math.exp(column[c]) / norm - (c == targets[b][n])) / 16
    expected /= 16

    student = student.float().requires_grad_(True)
    loss = attention_match_loss(student, teacher.float())
    loss.backward()
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(student.grad.double().view(2, 3, 8), grad, atol=1e-7, rtol=1e-5)
    identity_target = torch.tensor(owners[0][1])  # what pairing by slot index would give image 0
    assert not torch.equal(identity_target, torch.tensor(targets[0]))


def test_match_loss_needs_a_partner_for_every_teacher_slot():
    with pytest.raises(ValueError, match=r"S' <= S"):
        attention_match_loss(torch.rand(1, 3, 2, 2), torch.rand(1, 4, 2, 2))


def test_init_from_a_spot_checkpoint_pairs_keys_by_position(tmp_path):
    spot = _randomise(tiny("spot_r-coco"))
    state = smoothsa.official_state_dict(spot)
    # Swap the names of two same-shaped neighbours: pairing by position must follow the order, not the names.
    keys = list(state)
    k, v = keys.index("m.aggregat.proj_k.weight"), keys.index("m.aggregat.proj_v.weight")
    keys[k], keys[v] = keys[v], keys[k]
    renamed = dict(zip(keys, state.values()))
    path = tmp_path / "spot-0025.pth"
    torch.save(renamed, path)

    model = tiny(NAME)
    fresh_mean = model.student.initializ.mean.detach().clone()
    init_distill_from_spot(model, path)
    ours = smoothsa.official_state_dict(model)
    for name, value in state.items():
        assert torch.equal(ours["m.teacher." + name[2:]], value), name
        if not name.startswith("m.initializ."):
            assert torch.equal(ours["m.student." + name[2:]], value), name
    assert torch.equal(ours["m.student.encode_backbone2.proj.weight"], state["m.encode_backbone.proj.weight"])
    assert torch.equal(model.student.initializ.mean, fresh_mean)  # NormalSeparat keeps its own start

    x, noise = torch.randn(2, 3, 32, 32), torch.randn(2, 7, 32)
    model.eval()
    spot.eval()
    with torch.no_grad():
        assert torch.equal(model(x, teacher_noise=noise).teacher_attn_dec, spot(x, init_noise=noise).attn_dec)


def test_init_from_the_wrong_checkpoint_is_one_clear_line(tmp_path):
    model = tiny(NAME)
    other = tmp_path / "smoothsa.pth"
    torch.save(smoothsa.official_state_dict(tiny("smoothsa_r-coco")), other)
    with pytest.raises(ValueError, match=r"smoothsa.pth is not a checkpoint of the teacher's SPOT: m\.\* has \d+ keys, "
                                         r"m\.teacher\.\* expects \d+") as info:
        init_distill_from_spot(model, other)
    assert "\n" not in str(info.value)

    wide = smoothsa.build_model(apply_overrides(get_preset("spot_r-coco"), TINY + ["model.slot_dim=16"]).model)
    with pytest.raises(ValueError, match=r"m\.initializ\.mean \(1, 1, 16\) pairs with m\.teacher\.initializ\.mean "
                                         r"\(1, 1, 32\)"):
        init_distill_from_spot(model, smoothsa.official_state_dict(wide))
    no_backbone = smoothsa.official_state_dict(smoothsa.build_model("spot_r-coco", backbone=False))
    with pytest.raises(
        ValueError, match=r"the given state_dict is not .*: m\.\* has 68 keys, m\.teacher\.\* expects 241"
    ):
        init_distill_from_spot(smoothsa.build_model(NAME), no_backbone)


def test_a_distillation_checkpoint_round_trips():
    source = _randomise(tiny(NAME)).eval()
    target = smoothsa.load_official(tiny(NAME), smoothsa.official_state_dict(source)).eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.randn(2, 7, 32)
    with torch.no_grad():
        a, b = source(x, teacher_noise=noise), target(x, teacher_noise=noise)
    assert torch.equal(a.slots, b.slots) and torch.equal(a.teacher_attn_dec, b.teacher_attn_dec)


def _losses(model, task, batch, noise) -> dict[str, float]:
    """The weighted losses in training mode at fixed draws: both initializers' noise and the decoder's order."""
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(batch["image"], init_noise=noise[0], teacher_noise=noise[1])
    return {k: v.item() for k, v in task.losses(out, batch).items()}


# At the official weights the reconstruction term dominates ten steps (the weighted match term is thousands of
# times smaller at this size); with the match term alone, the same steps must lower it.
MATCH_ONLY = ["optim.loss_weights.recon=0", "optim.loss_weights.match=1"]


@pytest.mark.parametrize("weights,lowered", [([], "total"), (MATCH_ONLY, "match")], ids=["official", "match_only"])
def test_training_steps_from_a_spot_checkpoint_lower_the_losses(tmp_path, weights, lowered):
    g = torch.Generator().manual_seed(1)
    torch.save(smoothsa.official_state_dict(_randomise(tiny("spot_r-coco"))), tmp_path / "spot.pth")
    model = init_distill_from_spot(tiny(NAME), tmp_path / "spot.pth").train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not _trainable(k)}
    task = SpotDistill(apply_overrides(get_preset(NAME), weights))
    batch = {"image": torch.randn(4, 3, 32, 32, generator=g)}
    noise = torch.randn(2, 4, 7, 32, generator=g)

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    before = _losses(model, task, batch, noise)
    for _ in range(10):
        out = model(batch["image"], init_noise=noise[0], teacher_noise=noise[1])
        total = sum(task.losses(out, batch).values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 0.3, norm_type="inf")
        optimizer.step()
    after = _losses(model, task, batch, noise)
    before["total"], after["total"] = sum(before.values()), sum(after.values())
    assert after[lowered] < 0.99 * before[lowered], (before, after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())  # teacher and frozen copy


def test_metrics_are_the_students():
    model = _randomise(tiny(NAME)).eval()
    x = torch.randn(2, 3, 32, 32)
    segment = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 32, 32)), 3).bool()
    task = SpotDistill(get_preset(NAME))
    with torch.no_grad():
        out = task.forward(model, {"image": x})
        student = model.student(x)
    ours = task.metrics(out, {"segment": segment}, official_compat=False)
    for key, value in Spot(get_preset("spot_r-coco")).metrics(student, {"segment": segment}, False).items():
        torch.testing.assert_close(ours[key], value, equal_nan=True)
    assert not torch.equal(out.attn_dec, out.teacher_attn_dec)

"""Trainer.step on every kind of model: one step changes the weights exactly as a plain loop does (float64),
reads nothing on the host, and skips non-finite steps on the device."""
import copy
import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smoothsa import losses, schedules
from smoothsa.evaluation import loader_for
from smoothsa.presets import apply_overrides, get_preset
from smoothsa.trainer import RunOptions, Trainer

TINY = [
    "model.backbone=patch", "model.image_size=32", "model.grid=4", "model.feature_dim=32", "model.slot_dim=16",
    "model.decoder_layers=1", "model.num_slots=4", "optim.total_steps=40",
]
PRESETS = {
    "smoothsa_r-coco": [],
    "spot_r-coco": [],
    "smoothsav_c-movi_c": [],
    "smoothsa_r_recogn-coco": ["model.num_classes=5"],
}
OPTIONS = RunOptions(amp="none", compile=False, workers=0)


def make_batch(preset, b: int = 2, frames: int = 3, objects: int = 3, seed: int = 0) -> dict:
    """A batch in the loaders' format: image / video N(0, 1), boxes l < r, t < b, quadrant segments."""
    generator = torch.Generator().manual_seed(seed)
    size = preset.model.image_size
    video = preset.model.arch == "smoothsa_video"
    lead = (b, frames) if video else (b,)
    batch = {"video" if video else "image": torch.randn(*lead, 3, size, size, generator=generator, dtype=torch.float64)}
    corners = torch.rand(*lead, objects, 2, 2, generator=generator, dtype=torch.float64)
    batch["bbox"] = torch.cat([corners.min(-1).values, corners.max(-1).values], -1)  # (B, [T,] R, 4)
    index = torch.zeros(size, size, dtype=torch.long)
    half = size // 2
    index[:half, :half], index[:half, half:], index[half:, :half] = 1, 2, 3  # background: the 4th quadrant
    segment = torch.nn.functional.one_hot(index, objects + 1).bool()
    batch["segment"] = segment.expand(*lead, size, size, objects + 1).clone()
    batch["clazz"] = torch.randint(1, 5, (*lead, objects), generator=generator).to(torch.uint8)
    return batch


def reference_step(model, preset, batch, step: int, optimizer) -> None:
    """One step written out plainly from the official procedure: schedules, forward, weighted losses, backward,
    clipping, Adam."""
    optim = preset.optim
    for group in optimizer.param_groups:
        group["lr"] = schedules.linear_warmup_cosine(step, optim.total_steps, optim.lr)
    weights = optim.loss_weights
    arch = preset.model.arch
    if "preheat" in weights:
        model.initializ.detach_flag.fill_(schedules.detach_flag(step, optim.total_steps, optim.preheat_detach))
    if arch == "recognition":
        out = model(batch["image"], None, None, batch["segment"], batch["clazz"], batch["bbox"])
        ce, l1 = losses.recognition_losses(out.class_logits.float(), out.class_target, out.box_pred.float(), out.box_target)
        loss = weights["ce"] * ce + weights["l1"] * l1
    else:
        pixels = batch["video"] if arch == "smoothsa_video" else batch["image"]
        out = model(pixels, batch["bbox"] if arch == "smoothsa_video" else None)
        loss = weights["recon"] * losses.reconstruction_loss(out.recon, out.feature)
        if "preheat" in weights:
            first = out.slots[:, 0] if arch == "smoothsa_video" else out.slots
            loss = loss + weights["preheat"] * losses.preheat_loss(out.qinit, first)
        if "ssc" in weights:
            loss = loss + weights["ssc"] * losses.slot_contrast_loss(out.slots.float())  # float32, as the task
    loss.backward()
    if optim.clip_norm is not None:
        norm_type = math.inf if optim.clip_type == "inf" else 2.0
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], optim.clip_norm, norm_type)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def float64_trainer(name: str, *extra) -> Trainer:
    preset = apply_overrides(get_preset(name), TINY + PRESETS[name] + list(extra))
    trainer = Trainer(preset, OPTIONS, device="cpu")
    trainer.model.double()  # the optimizer holds the same Parameter objects
    return trainer


@pytest.mark.parametrize("name", list(PRESETS))
def test_step_changes_the_weights_as_the_plain_loop(name):
    trainer = float64_trainer(name)
    preset = trainer.preset
    reference = copy.deepcopy(trainer.model)
    optimizer = torch.optim.Adam([p for p in reference.parameters() if p.requires_grad], lr=preset.optim.lr, foreach=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for step, start in enumerate([0, 2, 5]):  # step 0 has lr 0; warm-up ends at step 2 of 40
        trainer.step_count = reference_steps = start
        batch = make_batch(preset, seed=step)
        torch.manual_seed(100 + step)
        terms = trainer.step(batch)
        torch.manual_seed(100 + step)
        reference_step(reference, preset, batch, reference_steps, optimizer)
        assert terms and all(value.dim() == 0 and bool(torch.isfinite(value)) for value in terms.values())
    after, expected = trainer.model.state_dict(), reference.state_dict()
    trained = [k for k, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all(not torch.equal(after[k], before[k]) for k in trained if "detach_flag" not in k)
    for key in after:
        torch.testing.assert_close(after[key], expected[key], rtol=1e-12, atol=1e-14, msg=key)
    assert int(trainer.bad_steps) == 0


class HostReads(TorchDispatchMode):
    """Counts the reads of one tensor value on the host (`.item()`, `bool(t)`, `int(t)`, `float(t)`: each an
    `aten._local_scalar_dense`, a device sync on CUDA)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def count_host_copies(monkeypatch) -> dict:
    """Counts `.numpy()` and `.tolist()` calls (a whole tensor to the host: on the CPU they are not dispatched)."""
    counts = {"numpy": 0, "tolist": 0}
    for method in counts:
        real = getattr(torch.Tensor, method)

        def counted(self, *args, _real=real, _method=method, **kwargs):
            counts[_method] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    return counts


# Host copies a step needs: recognition hands the IoU matrix to scipy's Hungarian solver (with official_compat
# also which values each image's mask holds); a discovery step needs none.
HOST_COPIES = {("smoothsa_r_recogn-coco", False): 1, ("smoothsa_r_recogn-coco", True): 2}


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
@pytest.mark.parametrize("name, official_compat", [(name, False) for name in PRESETS] + [("smoothsa_r_recogn-coco", True)])
def test_steps_read_no_value_on_the_host(name, official_compat, amp, monkeypatch):
    """Steps 2-4 (Adam's state exists from step 1 on) of every model kind, fp32, bf16 and fp16 with its GradScaler
    (official_compat changes the step of recognition only: its matching)."""
    preset = apply_overrides(get_preset(name), TINY + PRESETS[name])
    trainer = Trainer(preset, RunOptions(amp=amp, compile=False, workers=0, official_compat=official_compat), "cpu")
    batches = [{k: v.float() if v.is_floating_point() else v for k, v in make_batch(preset, seed=s).items()}
               for s in range(4)]  # fmt: skip
    trainer.step_count = 5  # past the warm-up: lr > 0
    trainer.step(batches[0])
    copies = count_host_copies(monkeypatch)
    with HostReads() as reads:
        terms = [trainer.step(batch) for batch in batches[1:]]
    monkeypatch.undo()
    assert reads.count == 0
    assert copies == {"numpy": 3 * HOST_COPIES.get((name, official_compat), 0), "tolist": 0}
    assert int(trainer.bad_steps) == 0 and all(bool(v != 0) for step in terms for v in step.values())


def test_a_non_finite_step_changes_nothing_and_is_counted(monkeypatch):
    trainer = float64_trainer("smoothsa_r-coco")
    batch = make_batch(trainer.preset)
    trainer.step_count = 5
    trainer.step(batch)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = copy.deepcopy(trainer.optimizer.state_dict()["state"])
    real = type(trainer.task).losses
    monkeypatch.setattr(type(trainer.task), "losses",
                        lambda self, out, batch: {k: v * float("nan") for k, v in real(self, out, batch).items()})
    for _ in range(3):
        trainer.step(batch)
    assert trainer.step_count == 9 and int(trainer.bad_steps) == 3
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, weights[key]) or "detach_flag" in key, key
    state = trainer.optimizer.state_dict()["state"]
    for index, entry in moments.items():
        for field, value in entry.items():
            assert torch.equal(state[index][field], value), (index, field)
    with pytest.raises(FloatingPointError, match="3 consecutive steps had a non-finite loss"):
        trainer.options = RunOptions(max_bad_steps=2)
        trainer.check_bad_steps()
    monkeypatch.undo()
    trainer.step(batch)
    assert int(trainer.bad_in_row) == 0 and int(trainer.worst_bad_run) == 3


def test_a_logging_step_reads_the_terms_and_the_skip_count_in_one_transfer(monkeypatch):
    trainer = float64_trainer("smoothsa_r-coco")
    batch = make_batch(trainer.preset)
    terms = trainer.step(batch)
    trainer.bad_steps += 2
    transfers = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: transfers.append(self.shape) or real(self))
    values, skipped = trainer.read_logged(terms)
    assert transfers == [(len(terms) + 2,)] and skipped == 2
    assert values == {k: float(v) for k, v in terms.items()}


def test_recognition_step_without_a_match_is_skipped():
    trainer = float64_trainer("smoothsa_r_recogn-coco")
    batch = make_batch(trainer.preset)
    batch["segment"][..., 1:] = False  # no object: nothing to match
    batch["segment"][..., 0] = True
    trainer.step_count = 5
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    terms = trainer.step(batch)
    assert all(float(v) == 0.0 for v in terms.values())
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert int(trainer.bad_steps) == 0 and trainer.step_count == 6


def test_state_dict_round_trip_continues_identically():
    first = float64_trainer("smoothsa_r-coco")
    batch = make_batch(first.preset)
    first.step_count = 3
    first.step(batch)
    second = float64_trainer("smoothsa_r-coco")
    state = copy.deepcopy(first.state_dict())
    first.step(batch)
    second.load_state_dict(state)  # the RNG state comes with it: the same decoder masks
    assert second.step_count == 4
    second.step(batch)
    for (key, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), key


FIT = TINY + ["data.dataset=synthetic", "optim.batch_size=4", "optim.val_batch_size=8", "optim.total_steps=8",
              "optim.validations=2"]


def _fit(data, out, clock=None, **options):
    from smoothsa.evaluation import loader_for

    preset = apply_overrides(get_preset("smoothsa_r-coco"), FIT)
    trainer = Trainer(preset, RunOptions(amp="none", compile=False, workers=0, **options), device="cpu")
    if clock is not None:
        trainer.clock = clock
    return trainer, lambda: trainer.fit(loader_for(preset, data, "train", 4, True), loader_for(preset, data, "val", 8, False), out)


def test_images_per_s_counts_training_time_only(data, tmp_path):
    """With a clock that moves 1 s per step and 1000 s per validation, 4 images a step read 4 images/s."""
    import csv

    now = [0.0]
    trainer, fit = _fit(data, tmp_path, clock=lambda: now[0], log_every=2)
    step, validate = trainer.step, trainer.validate

    def timed_step(batch):
        now[0] += 1.0
        return step(batch)

    def slow_validate(loader, keep_first=False):
        now[0] += 1000.0
        return validate(loader, keep_first)

    trainer.step, trainer.validate = timed_step, slow_validate
    fit()
    with open(tmp_path / "log.csv") as f:
        rates = [float(row["value"]) for row in csv.DictReader(f) if row["name"] == "images_per_s"]
    assert rates == [4.0] * 4


def test_tensorboard_gets_the_scalars_and_the_slot_picture(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, fit = _fit(data, tmp_path)
    fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"train/loss", "train/images_per_s", "val/ari_fg", "val/loss_recon"} <= set(events.Tags()["scalars"])
    pictures = events.Images("val/slots")
    assert [p.step for p in pictures] == [4, 8]
    # 8 samples of 32×32 pixels: image, truth, prediction and one tile per slot (4).
    assert (pictures[0].height, pictures[0].width) == (8 * 32, (3 + 4) * 32)


def test_device_cuda_means_the_local_rank_gpu(monkeypatch):
    from smoothsa.trainer import Distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU is visible here .*use --device cpu"):
        Distributed("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Distributed("cuda").device == torch.device("cuda", 1)
    assert Distributed(None).device == torch.device("cuda", 1)
    assert Distributed("cuda:0").device == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"2 GPU\(s\) visible"):
        Distributed("cuda:2")


def test_a_stop_requested_by_an_after_step_hook_saves_a_state_that_resumes_to_the_same_weights(data, tmp_path):
    from smoothsa.checkpoint import read_checkpoint
    from smoothsa.state import load_training_state

    _, whole = _fit(data, tmp_path / "whole")
    whole()
    stopped, fit = _fit(data, tmp_path / "stopped")
    calls = []

    def stop_at_3(trainer):
        calls.append(trainer.step_count)
        if trainer.step_count == 3:
            trainer.stop_reason = "test"

    stopped.after_step.append(stop_at_3)
    fit()
    assert calls == [1, 2, 3] and not stopped.finished and not (tmp_path / "stopped" / "last.pth").exists()
    resumed, fit = _fit(data, tmp_path / "stopped")
    resumed.load_state_dict(load_training_state(tmp_path / "stopped" / "state.pt"))
    assert (resumed.step_count, resumed.epoch, resumed.batch_in_epoch) == (3, 0, 3)
    fit()
    assert resumed.finished
    expected, again = read_checkpoint(tmp_path / "whole" / "last.pth"), read_checkpoint(tmp_path / "stopped" / "last.pth")
    assert expected.keys() == again.keys() and all(torch.equal(expected[k], again[k]) for k in expected)


def test_the_torch_gpu_loader_trains_the_weights_of_the_torch_loader(data):
    """Four steps through the Trainer from the `torch` and the `torch-gpu` loader (same windows and flips,
    images within one uint8 level) reach the same weights: each Adam step moves a weight by up to lr, so four
    move it by up to 4 lr; the two runs differ by less than one step's lr (Adam's update of a weight whose
    gradient is near 0 follows the gradient's sign, which a level's difference may flip)."""
    preset = apply_overrides(get_preset("smoothsa_r-coco"), FIT)
    weights = []
    for backend in ("torch", "torch-gpu"):
        trainer = Trainer(preset, OPTIONS, device="cpu")
        start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        loader = loader_for(preset, data, "train", preset.optim.batch_size, True, 0, backend, preset.optim.seed,
                            keys=trainer.task.train_keys)  # fmt: skip
        trainer.step_count = 2  # past the warm-up
        for batch in itertools.islice(loader, 4):
            trainer.step(batch)
        weights.append(trainer.model.state_dict())
    lr = preset.optim.lr
    moved = max((value - start[key]).abs().max() for key, value in weights[0].items() if value.is_floating_point())
    assert moved > 2 * lr
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=lr, msg=key)

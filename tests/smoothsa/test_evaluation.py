"""The one evaluation loop: per-sample seeded noise, distributed reductions that count each sample once, and
`--official-compat` reaching the recognition matcher in training validation and in `eval` alike."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from smoothsa import recognition
from smoothsa.build import build_model
from smoothsa.dataio import write_synthetic
from smoothsa.eval import evaluate_model
from smoothsa.evaluation import SplitMean, evaluate, loader_for, sample_noise
from smoothsa.presets import apply_overrides, get_preset
from smoothsa.tasks import task_for
from smoothsa.trainer import RunOptions, Trainer

TINY = [
    "model.backbone=patch", "model.image_size=32", "model.grid=4", "model.feature_dim=32", "model.slot_dim=16",
    "model.decoder_layers=1", "model.num_slots=4", "data.dataset=synthetic", "optim.val_batch_size=3",
]


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    """A validation split of 7 scenes: 2 processes get 4 each, one of them a padded repeat."""
    root = tmp_path_factory.mktemp("seven")
    write_synthetic(root, "val", num=7, height=40, width=40, seed=5)
    return root


def test_noise_is_per_sample_and_independent_of_the_slot_padding():
    a = sample_noise(1, [4, 9], (3, 16), torch.device("cpu"))
    b = sample_noise(1, [9], (5, 16), torch.device("cpu"))
    assert a.shape == (2, 3, 16) and torch.equal(a[1], b[0, :3])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a, sample_noise(2, [4, 9], (3, 16), torch.device("cpu")))


def test_split_mean_skips_nan_and_weights_by_count():
    mean = SplitMean(torch.device("cpu"))
    mean.update({"x": torch.tensor([1.0, float("nan"), 3.0])})
    mean.update({"x": torch.tensor([[5.0]])})
    assert mean.compute({"n": "x"}) == {"x": 3.0, "n": 3}


def _scores(preset, data, rank: int, world_size: int, batch_size: int) -> dict:
    torch.manual_seed(0)
    model = build_model(preset.model)
    loader = loader_for(preset, data, "val", batch_size, False, rank=rank, world_size=world_size)
    return evaluate(model, task_for(preset), loader, torch.device("cpu"), seed=42, with_losses=True).results


def _rank(rank: int, world_size: int, data, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        results = _scores(apply_overrides(get_preset("smoothsa_r-coco"), TINY), data, rank, world_size, 3)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_distributed_validation_with_an_uneven_split_equals_one_process(seven, tmp_path):
    preset = apply_overrides(get_preset("smoothsa_r-coco"), TINY)
    single = _scores(preset, seven, 0, 1, 2)  # another batch size too: the noise is per sample
    out = tmp_path / "ranks.json"
    mp.spawn(_rank, args=(2, seven, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2, join=True)
    both = json.loads(out.read_text())
    assert set(both) == set(single) >= {"ari", "ari_fg", "mbo", "miou", "loss_recon", "loss_preheat"}
    for key in single:
        # Metrics are float64 per sample; a loss is a float32 mean over a batch, and the batches differ.
        rel = 1e-6 if key.startswith("loss_") else 1e-12
        assert both[key] == pytest.approx(single[key], rel=rel), key


RECOGNITION = TINY + ["data.dataset=coco", "model.num_classes=4", "optim.batch_size=4", "optim.total_steps=2"]


def test_official_compat_reaches_the_matcher_in_training_validation_and_eval(data, monkeypatch):
    """Training's validation and `eval` match the same objects, and with the switch only objects 0 and 1."""
    seen = []
    real = recognition.match_slots_to_objects

    def recording(pred, gt, thresh_iou=0.1, official_compat=False):
        matches = real(pred, gt, thresh_iou, official_compat)
        seen.append((official_compat, matches.obj.tolist()))
        return matches

    monkeypatch.setattr(recognition, "match_slots_to_objects", recording)
    preset = apply_overrides(get_preset("smoothsa_r_recogn-coco"), RECOGNITION)
    results = {}
    for compat in (False, True):
        trainer = Trainer(preset, RunOptions(amp="none", compile=False, workers=0, official_compat=compat), "cpu")
        val_loader = loader_for(preset, data, "val", 3, False)
        seen.clear()
        validated = trainer.validate(val_loader).results
        assert {flag for flag, _ in seen} == {compat}
        objects = [obj for _, objs in seen for obj in objs]
        seen.clear()
        evaluated = evaluate_model(trainer.model, preset, data, official_compat=compat, batch_size=5)
        assert {flag for flag, _ in seen} == {compat}
        assert validated["num"] == evaluated["num"] == len(objects)
        for key in ("top1", "top3", "iou"):
            assert validated[key] == pytest.approx(evaluated[key], rel=1e-12, nan_ok=True), key
        results[compat] = validated, objects
        seen.clear()
        train_loader = loader_for(preset, data, "train", 4, True)
        trainer.step(next(iter(train_loader)))
        assert {flag for flag, _ in seen} == {compat}  # training matches the same way
    (exact, exact_objects), (official, official_objects) = results[False], results[True]
    assert set(official_objects) <= {0, 1} and max(exact_objects) >= 2
    assert official["num"] < exact["num"]
    assert json.loads(json.dumps(trainer.config()))["options"]["official_compat"] is True

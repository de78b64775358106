"""The embedded default run: `python -m smoothsa.train` with no arguments.

It writes a synthetic dataset (if absent), trains the `demo` preset on the CPU, evaluates it, compares it with
two trivial segmentations, and writes metrics and pictures:

    runs/demo/data/{train,val}.lmdb    synthetic scenes of 2–4 coloured shapes on textured grounds, 128×128
    runs/demo/ckpt-*.pth, last.pth     checkpoints (official key layout), state.pt (for --resume)
    runs/demo/eval/metrics.json        ARI, ARI-fg, mBO, mIoU on the validation split, with the baselines
    runs/demo/eval/slots.png           image | ground truth | prediction | one tile per slot
"""
import json
import time
from pathlib import Path

import torch

from smoothsa import runs
from smoothsa.checkpoint import load_official
from smoothsa.dataio import write_synthetic
from smoothsa.eval import save_pictures
from smoothsa.evaluation import loader_for
from smoothsa.metrics import MetricAverager, ari, mbo, miou
from smoothsa.presets import apply_overrides, get_preset
from smoothsa.state import atomic_write_text
from smoothsa.trainer import RunOptions, Trainer, train

TRAIN_IMAGES = 5000
VAL_IMAGES = 256
# 2–4 objects whose sides are 1/4 to 1/2 of the image: a 16×16 token grid resolves them, and a fixed grid of
# blocks, which scores well on FG-ARI when objects are small enough to rarely straddle a block, does not.
SCENES = dict(num_objects=(2, 4), object_size=(0.25, 0.5))


def ensure_data(root: Path, size: int) -> Path:
    """Writes the synthetic splits unless they are there (each LMDB file appears only once complete)."""
    for split, num in (("train", TRAIN_IMAGES), ("val", VAL_IMAGES)):
        if not (root / f"{split}.lmdb").exists():
            write_synthetic(root, split, num=num, height=size, width=size, seed=0, progress=True, **SCENES)
    return root


def baseline_segments(kind: str, b: int, h: int, w: int) -> torch.Tensor:
    """Trivial predictions (B, H·W, K) bool: every pixel in one slot, or a fixed 3×3 grid of blocks."""
    if kind == "one_slot":
        return torch.ones(b, h * w, 1, dtype=torch.bool)
    rows = torch.arange(h)[:, None] * 3 // h
    cols = torch.arange(w)[None, :] * 3 // w
    index = (rows * 3 + cols).flatten()  # (H·W,)
    return torch.nn.functional.one_hot(index, 9).bool()[None].expand(b, -1, -1)


def baselines(preset, data: Path) -> dict:
    """ARI, ARI-fg, mBO, mIoU of the trivial predictions on the validation split."""
    loader = loader_for(preset, data, "val", preset.optim.val_batch_size, training=False)
    scores = {kind: MetricAverager() for kind in ("one_slot", "grid_3x3")}
    for batch in loader:
        segment = batch["segment"]  # (B, H, W, C)
        b, h, w, _ = segment.shape
        true = segment.reshape(b, h * w, -1)
        for kind, averager in scores.items():
            pred = baseline_segments(kind, b, h, w)
            averager.update({"ari": ari(pred, true), "ari_fg": ari(pred, true, fg=True), "mbo": mbo(pred, true),
                             "miou": miou(pred, true)})
    return {kind: averager.compute() for kind, averager in scores.items()}


# The demo model is small: compiling it, fp16 and loader processes cost more than they save, on any device.
DEMO_OPTIONS = RunOptions(amp="none", compile=False, workers=0)


def run_demo(out: str | Path | None = None, data: str | Path | None = None, overrides: list[str] = (),
             resume: bool = False, device: str | torch.device | None = None, options: RunOptions | None = None, *,
             overwrite: bool = False, **run_flags) -> dict | None:
    """Trains the demo preset (with `overrides`) into `out` (default runs/demo) on `data` (default: synthetic
    scenes written into `out/data`), evaluates it and prints it against the baselines. Returns the summary
    written to `out/eval/metrics.json`.

    The run folder is `smoothsa.trainer.train`'s: `resume` continues a stopped demo, `overwrite` starts it again,
    and a finished demo (run again as it was) says where its results are and returns them. `run_flags`: more
    arguments of `train` (`backbone_weights`, `save_every_min`, `keep_last`). A stop by a signal raises
    `cli.Stopped` (continue with --resume)."""
    out = Path(out or "runs/demo")
    preset = apply_overrides(get_preset("demo"), list(overrides))
    options = options or DEMO_OPTIONS
    device = device or "cpu"
    summary_path = out / "eval" / "metrics.json"
    if not (resume or overwrite) and (out / runs.METRICS).is_file():
        resume = True  # the demo run again as it was: a finished one says so (an unfinished one is refused)
    data = Path(data) if data else ensure_data(out / "data", preset.model.image_size)
    start = time.perf_counter()
    trainer = train(preset, data, out, options, resume=resume, device=device, overwrite=overwrite,
                    overrides=list(overrides), **run_flags)
    trained = time.perf_counter() - start
    if trainer is None:  # finished before
        if summary_path.is_file():
            print(f"the demo in {out} is done: metrics {summary_path}, pictures {out / 'eval' / 'slots.png'}; "
                  "--overwrite runs it again")
            return json.loads(summary_path.read_text())
        trainer, trained = Trainer(preset, options, device), None  # stopped between training and evaluation
        load_official(trainer.model, out / runs.LAST)
    evaluation = trainer.validate(loader_for(preset, data, "val", preset.optim.val_batch_size, False), keep_first=True)
    # The same loop and seed as the final validation: the numbers training logged, now with the pictures.
    metrics = {k: evaluation.results[k] for k in ("ari", "ari_fg", "mbo", "miou")}
    save_pictures(out / "eval", trainer.task, *evaluation.first)
    reference = baselines(preset, data)
    summary = {"val": metrics, "baselines": reference}
    if trained is not None:
        summary |= {"train_seconds": round(trained, 1), "total_seconds": round(time.perf_counter() - start, 1)}
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    if trained is not None:
        print(f"\ntrained in {trained / 60:.1f} min; validation on {VAL_IMAGES} synthetic images:")
    print(f"  {'':10s} {'ARI':>6s} {'ARI-fg':>6s} {'mBO':>6s} {'mIoU':>6s}")
    for name, row in [("SmoothSA", metrics)] + list(reference.items()):
        print(f"  {name:10s} {row['ari']:6.3f} {row['ari_fg']:6.3f} {row['mbo']:6.3f} {row['miou']:6.3f}")
    print(f"pictures: {out / 'eval' / 'slots.png'}; metrics: {summary_path}")
    return summary

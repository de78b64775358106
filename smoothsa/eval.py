"""Evaluation (docs/official.md §7): ARI, ARI-fg, mBO, mIoU per sample averaged over the split, or the
recognition scores, plus pictures of the slots.

    python -m smoothsa.eval --preset smoothsa_r-coco --ckpt runs/coco/ckpt-0100000.pth --data data/coco
    python -m smoothsa.eval --preset smoothsav_c-movi_c --ckpt movi_c.pth --data data/movi_c --official-compat
    python -m smoothsa.eval --preset smoothsa_r_recogn-coco --ckpt recogn.pth --data data/coco

Correct by default: ARI never overflows on whole videos and recognition keeps every matched object;
`--official-compat` reproduces the official arithmetic and filters bug for bug (docs/official.md §10.1, §10.2,
§10.13), so published numbers can be compared. `--seed` fixes the initializer's noise; by default it is the
preset's seed, so a checkpoint scores what training's validation logged for it (with the run's `--amp`).
The loop is `smoothsa.evaluation.evaluate`, the one training validates with. Data without ground-truth
segments (`--set data.dataset=folder`) reports the losses only. A user error (an unknown preset, a checkpoint
that does not fit, an empty split, a missing device) is one line on stderr and exit status 2 (`--debug` adds
the traceback).
"""
import argparse
import json
import os
from pathlib import Path

import torch

from smoothsa import cli, visualize
from smoothsa.build import build_model
from smoothsa.checkpoint import load_official
from smoothsa.cli import UserError
from smoothsa.dataio import BACKENDS, default_workers
from smoothsa.evaluation import evaluate, loader_for, picture_segments
from smoothsa.presets import Preset, apply_overrides, get_preset
from smoothsa.state import atomic_write_text
from smoothsa.tasks import Task, task_for


def evaluate_model(model: torch.nn.Module, preset: Preset, data, out: str | Path | None = None, seed: int | None = None,
                   official_compat: bool = False, device: str | torch.device = "cpu", batch_size: int | None = None,
                   workers: int = 0, backend: str = "torch", pictures: int = 8, amp: str = "none") -> dict:
    """Scores `model` on the validation split of `data` with `smoothsa.evaluation.evaluate` (seed: the
    preset's `optim.seed` unless given, as training's validation); writes `metrics.json` and pictures into `out`."""
    device = torch.device(device)
    model = model.to(device)
    task = task_for(preset)
    seed = preset.optim.seed if seed is None else seed
    try:
        loader = loader_for(preset, data, "val", batch_size or preset.optim.val_batch_size, False, workers, backend,
                            seed, device=device)
    except ValueError as error:  # the data layer's: an empty split, a reader without the keys the preset needs
        raise UserError(str(error)) from None
    evaluation = evaluate(model, task, loader, device, seed, official_compat, amp, keep_first=pictures > 0)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", json.dumps({"preset": preset.name, "seed": seed,
                                                            "official_compat": official_compat,
                                                            "val": evaluation.results}, indent=2))
        if evaluation.first is not None:
            save_pictures(out, task, *evaluation.first, most=pictures)
    return evaluation.results


def save_pictures(out: Path, task: Task, batch: dict, output, most: int = 8) -> Path:
    """slots.png (images) or slots.gif (videos) of the first `most` samples of a batch."""
    pixels, segment, pred = picture_segments(task, batch, output)
    if pixels.dim() == 5:
        return visualize.save_video_gif(out / "slots.gif", pixels, segment, pred, most=min(most, 4))
    return visualize.save_image_grid(out / "slots.png", pixels, segment, pred, most=most)


@cli.entry_point
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--ckpt", required=True, help="checkpoint in the official layout (ours or released)")
    parser.add_argument("--data", required=True, help="folder with val.lmdb")
    parser.add_argument("--out", help="where metrics.json and pictures go (default: beside the checkpoint)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, help="fixes the initializer's noise (default: the preset's optim.seed, "
                        "as training's validation)")
    parser.add_argument("--official-compat", action="store_true")
    parser.add_argument("--device", help="cpu, cuda (this process's GPU), cuda:1, … (default: the GPU, else CPU)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--workers", type=int, default=default_workers(), help="loader workers (default: one per CPU "
                        "less one, at most 15)")
    parser.add_argument("--loader", default="torch", choices=BACKENDS)
    parser.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"])
    parser.add_argument("--pictures", type=int, default=8, help="samples to draw (0: none)")
    cli.add_debug_argument(parser)
    args = parser.parse_args(argv)
    device = cli.resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    preset = apply_overrides(get_preset(args.preset), args.overrides)
    model = load_official(build_model(preset.model), args.ckpt)
    out = args.out or Path(args.ckpt).with_suffix("")
    results = evaluate_model(model, preset, args.data, out, args.seed, args.official_compat, device,
                             args.batch_size, args.workers, args.loader, args.pictures, args.amp)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

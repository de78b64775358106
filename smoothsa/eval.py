"""Evaluation (docs/official.md §7): ARI, ARI-fg, mBO, mIoU per sample averaged over the split, or the recognition scores,
plus pictures of the slots.

    python -m smoothsa.eval --preset smoothsa_r-coco --ckpt runs/coco/ckpt-0100000.pth --data data/coco
    python -m smoothsa.eval --preset smoothsav_c-movi_c --ckpt movi_c.pth --data data/movi_c --official-compat
    python -m smoothsa.eval --preset smoothsa_r_recogn-coco --ckpt recogn.pth --data data/coco

Correct by default: ARI never overflows on whole videos and recognition keeps every matched object;
`--official-compat` reproduces the official arithmetic and filters bug for bug (docs/official.md §10.1, §10.2, §10.13), so
published numbers can be compared. `--seed` fixes the initializer's noise, so two runs give the same numbers.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from smoothsa import visualize
from smoothsa.build import build_model
from smoothsa.checkpoint import load_official
from smoothsa.data import LoaderOptions, build_loader
from smoothsa.metrics import MetricAverager, segments_from_attention
from smoothsa.presets import Preset, apply_overrides, get_preset
from smoothsa.steps import discovery_metrics, model_inputs, recognition_scores


@torch.no_grad()
def evaluate(model: torch.nn.Module, preset: Preset, data, out: str | Path | None = None, seed: int = 0,
             official_compat: bool = False, device: str | torch.device = "cpu", batch_size: int | None = None,
             workers: int = 0, backend: str = "torch", pictures: int = 8, amp: str = "none") -> dict:
    """Scores `model` on the validation split of `data`; writes `metrics.json` and pictures into `out`."""
    device = torch.device(device)
    model = model.to(device).eval()
    if hasattr(model, "official_compat"):
        model.official_compat = official_compat
    loader = build_loader(preset, data, "val", LoaderOptions(
        batch_size=batch_size or preset.optim.val_batch_size, workers=workers, backend=backend, seed=seed,
        device_id=device.index if device.type == "cuda" else None))
    torch.manual_seed(seed)  # the initializer's eval-mode noise is the only random draw left
    averager = MetricAverager()
    first = None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    for batch in loader:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        pixels, condit = model_inputs(batch, preset)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if preset.model.arch == "recognition":
                out_ = model(pixels, condit, None, batch["segment"], batch["clazz"], batch["bbox"])
                averager.update(recognition_scores(out_))
                continue
            out_ = model(pixels, condit)
        averager.update(discovery_metrics(out_, batch["segment"], official_compat))
        if first is None:
            first = (pixels, batch["segment"], out_)
    results = averager.compute()
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"preset": preset.name, "seed": seed,
                                                      "official_compat": official_compat, "val": results}, indent=2))
        if first is not None and pictures > 0:
            save_pictures(out, *first, most=pictures)
    return results


def save_pictures(out: Path, pixels: torch.Tensor, segment: torch.Tensor, output, most: int = 8) -> Path:
    size = tuple(pixels.shape[-2:])
    pred = segments_from_attention(output.attn_dec.float(), size)
    if pixels.dim() == 5:
        return visualize.save_video_gif(out / "slots.gif", pixels, segment, pred, most=min(most, 4))
    return visualize.save_image_grid(out / "slots.png", pixels, segment, pred, most=most)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--ckpt", required=True, help="checkpoint in the official layout (ours or released)")
    parser.add_argument("--data", required=True, help="folder with val.lmdb")
    parser.add_argument("--out", help="where metrics.json and pictures go (default: beside the checkpoint)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0, help="fixes the initializer's noise")
    parser.add_argument("--official-compat", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--loader", default="torch", choices=["torch", "dali"])
    parser.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"])
    parser.add_argument("--pictures", type=int, default=8, help="samples to draw (0: none)")
    args = parser.parse_args(argv)
    try:
        preset = apply_overrides(get_preset(args.preset), args.overrides)
        model = load_official(build_model(preset.model), args.ckpt)
    except (KeyError, ValueError, FileNotFoundError, TypeError) as error:
        sys.exit(f"error: {error}")
    out = args.out or Path(args.ckpt).with_suffix("")
    results = evaluate(model, preset, args.data, out, args.seed, args.official_compat, args.device, args.batch_size,
                       args.workers, args.loader, args.pictures, args.amp)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

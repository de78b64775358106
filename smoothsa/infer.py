"""Segment your own images and videos with a trained model.

    python -m smoothsa.infer --preset smoothsa_r-coco --ckpt runs/coco/last.pth photos/ extra.jpg --out seg/
    python -m smoothsa.infer --preset smoothsav_r-ytvis --ckpt runs/ytvis/last.pth clip.mp4 frames/ --out seg/

INPUT: image files, folders (searched recursively) and glob patterns; for a video preset, video files (.mp4,
.avi, .webm, .mkv, .mov through PyAV: pip install -e ".[video]") and folders of frames. Each input is
preprocessed as validation data is (centred square crop, resize to the preset's size, ImageNet normalisation);
outside that square each pixel takes the prediction of the nearest pixel inside it.

Written to --out, per input STEM: images `STEM.png` (input | segments | one tile per slot, with a legend),
`STEM.masks.png` (uint8 slot index per pixel, at the input's own height and width), `STEM.slots.npy` (S, Ds)
float32; videos `STEM.gif`, `STEM.masks.npy` (T, H, W) uint8, `STEM.slots.npy` (T, S, Ds). `summary.json` lists
the inputs, preset, checkpoint, seed and each input's slot areas. The initializer's noise is seeded (--seed),
so two runs write identical files.

In Python:

    result = smoothsa.infer.segment(model, images, seed=0)   # images: uint8 (B, H, W, 3)
    result.masks, result.slots, result.attention
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from smoothsa import visualize
from smoothsa.build import build_model
from smoothsa.checkpoint import BACKBONE_KEY, load_official, read_checkpoint
from smoothsa.dataio.folder import (
    UnreadableInput,
    find_images,
    find_videos,
    is_image,
    is_video,
    natural_key,
    read_image,
    read_video,
    require_pyav,
)
from smoothsa.dataio.transforms import center_crop_window, derive_seed, preprocess
from smoothsa.models import SmoothSAVideo
from smoothsa.presets import apply_overrides, get_preset
from smoothsa.pretrained import BackboneWeightsError, resolve_backbone_weights


@dataclass
class Segmentation:
    """What `segment` returns. Leading axes are (B,) for images and (B, T) for videos.

    masks: uint8 slot index per input pixel, (B, [T,] H, W) at the inputs' own size (a list of per-input
        tensors when the inputs differ in size or length).
    slots: (B, [T,] S, Ds) float32.
    attention: (B, [T,] S, h, w) float32, the decoder attention the masks come from.
    """

    masks: torch.Tensor | list[torch.Tensor]
    slots: torch.Tensor | list[torch.Tensor]
    attention: torch.Tensor | list[torch.Tensor]


def slot_shape(model: nn.Module) -> tuple[int, int]:
    """(S, Ds) of the model's initializer noise; box-conditioned and recognition models are refused."""
    initializer = getattr(model, "initializ", None)
    num = getattr(initializer, "num", None)
    if initializer is None or num is None:
        raise ValueError(
            f"{type(model).__name__}: infer segments with discovery models whose slots need no boxes "
            "(SmoothSA, SmoothSAVideo with a shared initializer, SPOT); not box-conditioned or recognition models"
        )
    return num, initializer.mean.shape[-1]


def _pixels(item, video: bool) -> torch.Tensor:
    """(H, W, 3) or (T, H, W, 3) uint8 → (3, H, W) or (T, 3, H, W) uint8."""
    tensor = item if torch.is_tensor(item) else torch.tensor(np.asarray(item))
    rank = 4 if video else 3
    if tensor.dtype != torch.uint8 or tensor.dim() != rank or tensor.shape[-1] != 3:
        what = "(T, H, W, 3) frames" if video else "(H, W, 3) images"
        raise ValueError(f"segment: expected uint8 {what}, got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor.movedim(-1, -3)


def masks_at_input_size(attention: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Slot index per pixel of an input of height × width from the attention over its centred square.

    Bilinear upsampling to the square (align_corners False), first maximum over slots (docs/official.md §7.1);
    pixels outside the square take the index of the nearest pixel inside it.

    Shapes: attention ([T,] S, h, w) → ([T,] H, W) uint8.
    """
    window = center_crop_window(height, width)
    maps = attention.float().reshape(-1, *attention.shape[-3:])  # (T', S, h, w)
    side = (window.height, window.width)
    index = torch.stack([
        F.interpolate(m[None], size=side, mode="bilinear", align_corners=False)[0].argmax(0) for m in maps
    ]).to(torch.uint8)  # (T', side, side)
    pad = (window.left, width - window.left - window.width, window.top, height - window.top - window.height)
    index = F.pad(index[:, None].float(), pad, mode="replicate")[:, 0].to(torch.uint8)
    return index.reshape(*attention.shape[:-3], height, width)


@torch.no_grad()
def segment(model: nn.Module, images, seed: int | Sequence[int] = 0) -> Segmentation:
    """Segments a batch of images (or, for a video model, of videos) into the model's slots.

    Args:
        model: a discovery model with its backbone (`build_model(preset)` + a checkpoint), on any device.
        images: uint8 RGB, (B, H, W, 3) for an image model or (B, T, H, W, 3) for a video model, as a numpy
            array or tensor, or a list of (H, W, 3) / (T, H, W, 3) arrays of different sizes.
        seed: seeds the initializer's noise, one per input (derived from an int as `derive_seed(seed, b)`).

    Each input goes through the validation transform (`smoothsa.dataio.transforms.preprocess`).
    """
    video = isinstance(model, SmoothSAVideo)
    items = list(images)
    if not items:
        raise ValueError("segment: no images")
    seeds = [derive_seed(seed, b) for b in range(len(items))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(items):
        raise ValueError(f"segment: {len(seeds)} seeds for {len(items)} inputs")
    num_slots, slot_dim = slot_shape(model)
    device = next(model.parameters()).device
    model.eval()
    pixels = [_pixels(item, video) for item in items]
    inputs = [
        preprocess(p, None, False, model.image_size, window=center_crop_window(*p.shape[-2:]), flip=False)[0]
        for p in pixels
    ]
    noise = torch.stack([torch.randn(num_slots, slot_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])
    groups = [list(range(len(items)))] if len({x.shape for x in inputs}) == 1 else [[b] for b in range(len(items))]
    slots, attention = [None] * len(items), [None] * len(items)
    for group in groups:
        batch = torch.stack([inputs[b] for b in group]).to(device)
        out = model(batch, None, init_noise=noise[group].to(device))
        for i, b in enumerate(group):
            slots[b] = out.slots[i].float().cpu()
            attention[b] = out.attn_dec[i].float().cpu()
    masks = [masks_at_input_size(a, *p.shape[-2:]) for a, p in zip(attention, pixels)]
    if len({m.shape for m in masks}) == 1:
        return Segmentation(torch.stack(masks), torch.stack(slots), torch.stack(attention))
    return Segmentation(masks, slots, attention)


# ------------------------------------------------------------------------------------------------
# command line


@dataclass
class Input:
    path: Path
    name: str  # output stem, unique within a run
    kind: str  # "image" or "video"


@dataclass
class Collected:
    inputs: list[Input] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def skip(self, path, reason: str) -> None:
        print(f"warning: skipping {path}: {reason}", file=sys.stderr)
        self.skipped.append({"input": str(path), "reason": reason})


def _stem(path: Path, base: Path | None) -> str:
    relative = path.relative_to(base) if base is not None and path != base else Path(path.name)
    parts = list(relative.parts)
    if path.is_file():
        parts[-1] = Path(parts[-1]).stem
    return "__".join(parts)


def collect_inputs(arguments: Sequence[str], video: bool) -> Collected:
    """The inputs named on the command line: files, folders (recursive) and glob patterns, in that order,
    each once. Missing paths and files of the wrong kind are named and skipped."""
    collected, seen, names = Collected(), set(), set()

    def add(path: Path, base: Path | None) -> None:
        key = os.path.abspath(path)
        if key in seen:
            return
        seen.add(key)
        name = _stem(path, base)
        unique, count = name, 1
        while unique in names:
            count += 1
            unique = f"{name}-{count}"
        names.add(unique)
        collected.inputs.append(Input(path, unique, "video" if video else "image"))

    for argument in arguments:
        paths = [Path(argument)]
        if not paths[0].exists() and glob.has_magic(argument):
            paths = sorted((Path(p) for p in glob.glob(argument, recursive=True)), key=natural_key)
            if not paths:
                collected.skip(argument, "the pattern matches nothing")
        for path in paths:
            if path.is_dir():
                found = find_videos(path) if video else find_images(path)
                if not found:
                    kind = "videos or folders of frames" if video else "images"
                    collected.skip(path, f"no {kind} in this folder")
                for item in found:
                    add(item, path if item != path else None)
            elif not path.exists():
                collected.skip(path, "no such file or folder")
            elif (is_video(path) if video else is_image(path)):
                add(path, None)
            else:
                wanted = "video files (.mp4, .avi, .webm, .mkv, .mov) or folders of frames" if video else "image files"
                collected.skip(path, f"unsupported file type {path.suffix or '(none)'}; this preset takes {wanted}")
    return collected


def load_model(preset, ckpt: str, backbone_weights: str | None, device: str) -> tuple[nn.Module, str]:
    """The preset's model with the checkpoint loaded; the backbone from the checkpoint unless
    `backbone_weights` (PATH or auto) says otherwise or the checkpoint has none. Returns (model, banner)."""
    if preset.model.arch == "recognition" or preset.model.initializer == "mlp_preheated":
        raise ValueError(
            f"preset {preset.name} needs boxes or object labels; infer runs discovery presets without box "
            "conditioning (e.g. smoothsa_r-coco, smoothsav_r-ytvis, spot_r-coco)"
        )
    if backbone_weights == "random":
        raise ValueError("--backbone-weights random makes no sense for inference; give PATH or auto, or leave it out")
    model = build_model(preset.model)
    try:
        state = read_checkpoint(ckpt)
    except (FileNotFoundError, TypeError):
        raise
    except Exception as error:  # a truncated zip, an unpickling error: not a checkpoint
        raise ValueError(f"{ckpt}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    has_backbone = any(BACKBONE_KEY.search(k) for k in state)
    banner = f"backbone weights: from the checkpoint {Path(ckpt).name}"
    if preset.model.backbone == "dinov2" and not has_backbone:
        banner = resolve_backbone_weights(model, preset, backbone_weights or "auto")
        prefix = "m." if any(k.startswith("m.") for k in state) else ""
        kept = {prefix + k: v for k, v in model.state_dict().items() if BACKBONE_KEY.search(k)}
        state = {**kept, **state}
        backbone_weights = None
    load_official(model, state)
    if backbone_weights is not None:
        banner = resolve_backbone_weights(model, preset, backbone_weights)
    return model.to(device).eval(), banner


def _batches(inputs: list[Input], size: int):
    """Consecutive runs of at most `size` images; videos one at a time."""
    batch: list[Input] = []
    for item in inputs:
        if item.kind == "video":
            if batch:
                yield batch
                batch = []
            yield [item]
            continue
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_outputs(out: Path, item: Input, pixels: np.ndarray, masks: torch.Tensor, slots: torch.Tensor,
                  num_slots: int, rate: float | None = None) -> dict:
    """Writes one input's files; returns its summary entry."""
    masks_np = masks.numpy()
    slots_np = slots.numpy().astype(np.float32)
    np.save(out / f"{item.name}.slots.npy", slots_np)
    if item.kind == "image":
        visualize.save_segmentation_png(out / f"{item.name}.png", pixels, masks_np, num_slots)
        Image.fromarray(masks_np).save(out / f"{item.name}.masks.png")
        files = [f"{item.name}.png", f"{item.name}.masks.png", f"{item.name}.slots.npy"]
    else:
        frame_ms = round(1000 / rate) if rate else 200
        visualize.save_segmentation_gif(out / f"{item.name}.gif", pixels, masks_np, num_slots, frame_ms)
        np.save(out / f"{item.name}.masks.npy", masks_np)
        files = [f"{item.name}.gif", f"{item.name}.masks.npy", f"{item.name}.slots.npy"]
    areas = np.bincount(masks_np.reshape(-1), minlength=num_slots) / masks_np.size
    height, width = masks_np.shape[-2:]
    entry = {"input": str(item.path), "kind": item.kind, "height": int(height), "width": int(width)}
    if item.kind == "video":
        entry["frames"] = int(masks_np.shape[0])
    return entry | {"outputs": files, "slot_areas": [round(float(a), 6) for a in areas]}


def run(args: argparse.Namespace) -> dict:
    preset = apply_overrides(get_preset(args.preset), args.overrides)
    video = preset.model.arch == "smoothsa_video"
    collected = collect_inputs(args.inputs, video)
    if video and any(i.path.is_file() for i in collected.inputs):
        require_pyav()  # video files need PyAV: say so before loading the model
    if not collected.inputs:
        raise FileNotFoundError("nothing to segment: none of the inputs is a readable image, video or folder")
    model, banner = load_model(preset, args.ckpt, args.backbone_weights, args.device)
    num_slots, _ = slot_shape(model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{preset.name}: {len(collected.inputs)} input(s), {banner}, device {args.device}", file=sys.stderr)
    entries = []
    progress = tqdm(total=len(collected.inputs), desc="segment", unit="input", file=sys.stderr)
    position = {id(item): i for i, item in enumerate(collected.inputs)}
    for batch in _batches(collected.inputs, args.batch_size):
        readable, rates = [], []
        for item in batch:
            try:
                if item.kind == "image":
                    readable.append((item, read_image(item.path)))
                    rates.append(None)
                else:
                    frames, rate = read_video(item.path)
                    readable.append((item, frames))
                    rates.append(rate)
            except UnreadableInput as error:
                collected.skip(item.path, str(error).removeprefix(f"{item.path}: "))
        if readable:
            seeds = [derive_seed(args.seed, position[id(item)]) for item, _ in readable]
            result = segment(model, [pixels for _, pixels in readable], seed=seeds)
            for b, ((item, pixels), rate) in enumerate(zip(readable, rates)):
                entries.append(write_outputs(out, item, pixels, result.masks[b], result.slots[b], num_slots, rate))
        progress.update(len(batch))
    progress.close()
    if not entries:
        raise FileNotFoundError("nothing to segment: none of the inputs could be read")
    summary = {"preset": preset.name, "checkpoint": str(args.ckpt), "backbone": banner, "seed": args.seed,
               "num_slots": num_slots, "inputs": entries, "skipped": collected.skipped}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {len(entries)} segmentation(s) to {out}", file=sys.stderr)
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m smoothsa.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image or video files, folders, glob patterns")
    parser.add_argument("--preset", required=True, help="the preset the checkpoint was trained with")
    parser.add_argument("--ckpt", required=True, help="checkpoint in the official layout (ours or released)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="the preset overrides the checkpoint was trained with (repeatable)")
    parser.add_argument("--backbone-weights", metavar="PATH|auto",
                        help="DINOv2 weights to use instead of the checkpoint's (default: the checkpoint's, "
                             "else auto: the cached or downloaded pretrained file)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initializer's noise")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (videos: one)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, KeyError, ValueError, TypeError, ImportError, BackboneWeightsError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""Per-sample transforms and the collate function (docs/official.md §5), with the official semantics.

Training: random crop whose area range is relative to the largest centred square -> bilinear
antialiased resize of the uint8 image to 256x256 -> nearest-exact resize of the index map ->
horizontal flip with probability 0.5 -> ImageNet normalisation. Validation: centred square crop ->
the same resizes -> normalisation. Videos use one crop window and one flip for the whole clip.

Random draws follow the official sources of randomness: the crop window uses the torch RNG (a port of
torchvision's `RandomResizedCrop.make_params`), the flip and the clip start use Python's `random`.
Both can be given explicitly (tests, and the DALI pipeline, which must use the same window).

Shape alphabet: T frames, H, W pixels, C segment channels, n objects.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
CROP_SCALE = (0.75, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def derive_seed(*values: int) -> int:
    """A 32-bit seed derived from a tuple of integers (e.g. base seed, epoch, worker), distinct per tuple."""
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


@dataclass(frozen=True)
class CropWindow:
    """A crop in pixel indices: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int


def random_crop_window(
    height: int,
    width: int,
    scale: Sequence[float] = CROP_SCALE,
    ratio: Sequence[float] = CROP_RATIO,
    generator: torch.Generator | None = None,
) -> CropWindow:
    """The official `RandomCrop(size=None, scale)` window: RandomResizedCrop's sampler without the resize.

    The scale range is first multiplied by min(H, W)^2 / (H W), so areas are relative to the largest
    centred square rather than the whole image; then torchvision's `make_params` runs unchanged: 10
    tries of (area uniform in scale, aspect ratio log-uniform in ratio), else a centred fallback.

    Args:
        height, width: size of the image (or video frames) to crop.
        scale: area range, relative to the largest square.
        ratio: aspect-ratio (width / height) range.
        generator: torch RNG (default: the global one, as the official code).
    """
    area = height * width
    square = min(height, width) ** 2 / area
    low, high = scale[0] * square, scale[1] * square
    # torchvision keeps log(ratio) as a float32 tensor; reproduce its rounding
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(low, high, generator=generator).item()
        aspect_ratio = torch.exp(
            torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator)
        ).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return CropWindow(top, left, h, w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return CropWindow((height - h) // 2, (width - w) // 2, h, w)


def center_crop_window(height: int, width: int) -> CropWindow:
    """The official `CenterCrop(size=None)`: the centred square of side min(H, W)."""
    side = min(height, width)
    return CropWindow((height - side) // 2, (width - side) // 2, side, side)


def random_flip(p: float = 0.5, rng: random.Random | None = None) -> bool:
    """The official `RandomFlip(dims=[-1], p)` decision, drawing from Python's `random` the same way."""
    rng = rng or random  # the module-level generator, as the official code
    if rng.random() > p:
        return False
    rng.choice([-1])  # the official code then picks the flip axis; keep the RNG stream in step
    return True


def draw_params(
    height: int,
    width: int,
    is_training: bool,
    generator: torch.Generator | None = None,
    rng: random.Random | None = None,
) -> tuple[CropWindow, bool]:
    """Crop window and flip for one sample (or one clip): random in training, centred and unflipped otherwise."""
    if not is_training:
        return center_crop_window(height, width), False
    window = random_crop_window(height, width, generator=generator)
    return window, random_flip(rng=rng)


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 images to size x size, rounded back to uint8.

    torchvision resizes uint8 in float32 and rounds (`round_()` then `.to(uint8)`) except on AVX2
    CPUs, where it calls a native uint8 kernel that differs by at most one level on ~15 % of pixels;
    computing in float32 always keeps the result independent of the machine.

    Shapes:
        image: (..., 3, H, W) uint8 -> (..., 3, size, size) uint8
    """
    lead, (channels, height, width) = image.shape[:-3], image.shape[-3:]
    if (height, width) == (size, size):
        return image
    flat = image.reshape(-1, channels, height, width).float()  # (N, 3, H, W)
    out = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    # antialiased bilinear weights are non-negative, so the result stays inside [0, 255]
    return out.round_().to(torch.uint8).reshape(*lead, channels, size, size)


def resize_segment(segment: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-exact resize of uint8 index maps (no antialiasing: labels must not blend).

    Shapes:
        segment: (..., H, W) uint8 -> (..., size, size) uint8
    """
    lead, (height, width) = segment.shape[:-2], segment.shape[-2:]
    if (height, width) == (size, size):
        return segment
    flat = segment.reshape(-1, 1, height, width)  # (N, 1, H, W)
    out = F.interpolate(flat, size=(size, size), mode="nearest-exact")
    return out.reshape(*lead, size, size)


_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel, in float32 as the official `Normalize`, on the image's device.

    Shapes:
        image: (..., 3, H, W) uint8 -> (..., 3, H, W) float32
    """
    mean, std = _MEAN.to(image.device, non_blocking=True), _STD.to(image.device, non_blocking=True)
    return (image.float() - mean) / std


def preprocess(
    image: torch.Tensor,
    segment: torch.Tensor | None,
    is_training: bool,
    resolution: int = 256,
    window: CropWindow | None = None,
    flip: bool | None = None,
    generator: torch.Generator | None = None,
    rng: random.Random | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one preprocessing function of training and validation (docs/official.md §5.1).

    Args:
        image: uint8 RGB image or clip.
        segment: uint8 index map(s) of the same size, or None.
        is_training: random crop + flip when True; centred square crop, no flip, when False.
        resolution: output side.
        window: crop window to use instead of drawing one.
        flip: flip decision to use instead of drawing one.
        generator: torch RNG for the crop window (default: global).
        rng: Python RNG for the flip (default: the `random` module).

    Shapes:
        image: (3, H, W) or (T, 3, H, W) uint8 -> (3, R, R) or (T, 3, R, R) float32, normalised
        segment: (H, W) or (T, H, W) uint8 -> (R, R) or (T, R, R) uint8, still an index map
    """
    height, width = image.shape[-2:]
    if segment is not None and segment.shape[-2:] != (height, width):
        raise ValueError(f"image is {height}x{width} but its segment is {tuple(segment.shape[-2:])}")
    if window is None or flip is None:
        drawn_window, drawn_flip = draw_params(height, width, is_training, generator, rng)
        window = drawn_window if window is None else window
        flip = drawn_flip if flip is None else flip
    rows = slice(window.top, window.top + window.height)
    cols = slice(window.left, window.left + window.width)
    image = resize_image(image[..., rows, cols], resolution)
    if segment is not None:
        segment = resize_segment(segment[..., rows, cols], resolution)
    if flip:
        image = image.flip(-1)
        segment = segment.flip(-1) if segment is not None else None
    return normalize(image), segment


def strided_clip_start(num_frames: int, length: int, rng: random.Random | None = None) -> int:
    """First frame of the official `StridedRandomSliceSequence(size=length)` (training only).

    Videos of at most `length` frames are kept whole (start 0); otherwise the start is
    length * U{0 .. ceil(num_frames / length) - 1}, moved back to num_frames - length if the last
    stride would run past the end.
    """
    if num_frames <= length:
        return 0
    rng = rng or random
    start = length * rng.randint(0, math.ceil(num_frames / length) - 1)
    return min(start, num_frames - length)


# ------------------------------------------------------------------------------------------------
# collate

# per key: (axis to pad, counted from the end of the per-sample shape; pad value)
PAD_RULES: dict[str, tuple[int, float | bool]] = {
    "segment": (-1, False),  # (..., H, W, C): the mask channels
    "bbox": (-2, 0.0),  # (..., n, 4): objects; 0 as the official `ClPadToMax1` (MOVi pads -1, `ClPadTo1`)
    "clazz": (-1, 0),  # (..., n): objects
}


def pad_collate(samples: Sequence[dict], pad_rules: dict[str, tuple[int, float | bool]] = PAD_RULES) -> dict:
    """Pads `segment` channels and `bbox`/`clazz` objects to the batch maximum, then stacks (docs/official.md §5.2).

    Args:
        samples: per-sample dicts of tensors (and optionally other values: lists are made of them).
        pad_rules: key -> (axis from the end, pad value); keys not listed are stacked as they are.

    Shapes:
        segment: B x (..., H, W, C_i) -> (B, ..., H, W, max C_i) bool, padded with False
        bbox: B x (..., n_i, 4) -> (B, ..., max n_i, 4), padded with 0 (by the default rules)
        clazz: B x (..., n_i) -> (B, ..., max n_i), padded with 0
    """
    batch = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if not isinstance(values[0], torch.Tensor):
            batch[key] = values
            continue
        if key in pad_rules:
            axis, value = pad_rules[key]
            size = max(v.shape[axis] for v in values)
            padded = []
            for v in values:
                missing = size - v.shape[axis]
                if missing:
                    shape = list(v.shape)
                    shape[axis] = missing
                    v = torch.cat([v, torch.full(shape, value, dtype=v.dtype, device=v.device)], dim=axis)
                padded.append(v)
            values = padded
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(
                f"cannot batch '{key}' of shapes {sorted(shapes)}: clips of different lengths need batch_size=1"
            )
        batch[key] = torch.stack(values)
    return batch

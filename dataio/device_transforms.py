"""Batched crop, resize, flip and normalise of uint8 images and index maps, on any device (docs/official.md §5.1).

The same result as `transforms.preprocess` applied to every sample, for a whole batch at once: the inputs
are uint8 images (or clips) padded to a common size (the padding is never read), and per sample the crop
window and the flip that `transforms.draw_params` drew. The cost does not grow with the number of distinct
sizes in the batch: the crop and the flip are folded into the resampling taps, so a batch is a fixed number
of tensor ops (one gather and one multiply-add per filter tap and axis), whatever its mix of sizes and windows.

Why taps and not one `F.interpolate` per sample or per size group: crop windows are random, so in training
no two samples share a size and grouping by size degenerates to a call per sample (dozens of small kernel
launches and host round trips per batch); a dense resampling matrix per sample would be one `bmm` but costs
H·W·R multiply-adds per channel (about 20 GFLOP per batch of 32 COCO images) where the taps cost H·R·K.

Image resize: bilinear with antialiasing, align_corners=False, as `F.interpolate(..., antialias=True)`:
separable, width first then height, in float32, rounded to uint8 once at the end. The taps and weights
follow PyTorch's formula for the antialiased filter: with scale s = crop / R, support r = max(s, 1), output
pixel i has centre c = s·(i + 0.5) and reads source pixels j in [trunc(c - r + 0.5), trunc(c + r + 0.5))
with weight max(0, 1 - |j - c + 0.5| / max(s, 1)), normalised to sum 1. Only the order of the float32 sums
differs, so a pixel can differ by one uint8 level where the exact value lies within ~1e-4 of a half level
(5e-6 of the pixels of random images; up to 1e-3 on smooth ones, whose sums often land on exact halves).
No matrix product is involved, so TF32 settings cannot change the result.

Index-map resize: nearest-exact, source index min(floor((i + 0.5)·s), crop - 1) with s in float32 as
PyTorch computes it: identical to `transforms.resize_segment`.

Shape alphabet: B batch, T frames, H, W padded input size, R output side, K filter taps.
"""

from __future__ import annotations

import torch

from .transforms import normalize


def antialias_taps(
    start: torch.Tensor, length: torch.Tensor, resolution: int, flip: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and weights of the antialiased bilinear resize of [start, start + length) to `resolution`.

    Args:
        start, length: per sample, the crop along this axis (pixels of the padded input).
        resolution: output size R along the axis.
        flip: per sample, reverse the output along this axis.
        size: padded input size along the axis (indices of zero-weight taps are clamped inside it).

    Shapes:
        start, length: (B,) int64; flip: (B,) bool -> index (B, R, K) int64, weight (B, R, K) float32
    """
    device = start.device
    scale = length.to(torch.float32)[:, None] / resolution  # (B, 1)
    support = torch.clamp(scale, min=1.0)  # bilinear: 1 output pixel, stretched by the scale when shrinking
    center = scale * (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5)  # (B, R)
    low = torch.clamp((center - support + 0.5).trunc(), min=0).long()  # (B, R)
    high = torch.minimum((center + support + 0.5).trunc().long(), length[:, None])
    count = high - low  # taps per output pixel
    taps = int(count.max()) if count.numel() else 1
    offset = torch.arange(taps, device=device)  # (K,)
    source = low[..., None] + offset  # (B, R, K), relative to the crop
    distance = (source.to(torch.float32) - center[..., None] + 0.5) / support[..., None]
    weight = torch.clamp(1.0 - distance.abs(), min=0.0) * (offset < count[..., None])
    weight = weight / weight.sum(-1, keepdim=True)
    index = torch.clamp(source + start[:, None, None], max=size - 1)
    flip = flip[:, None, None]
    return torch.where(flip, index.flip(1), index), torch.where(flip, weight.flip(1), weight)


def nearest_exact_index(start: torch.Tensor, length: torch.Tensor, resolution: int, flip: torch.Tensor) -> torch.Tensor:
    """Source index of every output pixel of the nearest-exact resize of [start, start + length) to `resolution`.

    Shapes:
        start, length: (B,) int64; flip: (B,) bool -> (B, R) int64
    """
    scale = length.to(torch.float32)[:, None] / resolution  # (B, 1)
    position = torch.arange(resolution, device=start.device, dtype=torch.float32) + 0.5
    source = torch.minimum((position * scale).floor().long(), length[:, None] - 1)  # (B, R)
    source = source + start[:, None]
    return torch.where(flip[:, None], source.flip(1), source)


def resize_images(pixels: torch.Tensor, windows: torch.Tensor, flips: torch.Tensor, resolution: int) -> torch.Tensor:
    """Crops every sample to its window, resizes it (bilinear, antialiased) and flips it where asked.

    Args:
        pixels: uint8 images or clips, padded to a common size (the padding is never read).
        windows: per sample, the crop top, left, height, width (`transforms.CropWindow`), in pixels. Keep
            them on the CPU: the taps are computed there (no host sync) and moved to the pixels' device.
        flips: per sample, flip the width axis after resizing (same device as `windows`).
        resolution: output side R.

    Shapes:
        pixels: (B, [T,] 3, H, W) uint8; windows: (B, 4) int64; flips: (B,) bool -> (B, [T,] 3, R, R) uint8
    """
    device = pixels.device
    height, width = pixels.shape[-2:]
    batch = pixels.shape[0]
    planes = pixels.reshape(batch, -1, height, width)  # (B, P, H, W), P = [T ·] 3
    count = planes.shape[1]
    top, left, rows, cols = windows.unbind(1)
    tallest = int(rows.max())
    # the rows of each window first (a uint8 copy), so that the width pass only runs over rows in use
    row_index = torch.clamp(top[:, None] + torch.arange(tallest, device=windows.device), max=height - 1)  # (B, h)
    row_index = row_index.to(device, non_blocking=True)
    planes = planes.gather(2, row_index[:, None, :, None].expand(batch, count, tallest, width))  # (B, P, h, W)
    # width pass, with the flip folded into the taps: (B, P, h, W) -> (B, P, h, R)
    index, weight = (t.to(device, non_blocking=True) for t in antialias_taps(left, cols, resolution, flips, width))
    across = torch.zeros(batch, count, tallest, resolution, device=device)
    for tap in range(index.shape[-1]):
        gathered = planes.gather(3, index[:, None, None, :, tap].expand(batch, count, tallest, resolution))
        across.add_(gathered.to(torch.float32) * weight[:, None, None, :, tap])
    # height pass over the window's rows, which now start at 0: (B, P, h, R) -> (B, P, R, R)
    taps = antialias_taps(torch.zeros_like(top), rows, resolution, torch.zeros_like(flips), tallest)
    index, weight = (t.to(device, non_blocking=True) for t in taps)
    out = torch.zeros(batch, count, resolution, resolution, device=device)
    for tap in range(index.shape[-1]):
        gathered = across.gather(2, index[:, None, :, tap, None].expand(batch, count, resolution, resolution))
        out.add_(gathered * weight[:, None, :, tap, None])
    # the weights are non-negative and sum to 1, so the result stays inside [0, 255] up to rounding
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out.reshape(*pixels.shape[:-3], 3, resolution, resolution)


def resize_segments(segment: torch.Tensor, windows: torch.Tensor, flips: torch.Tensor, resolution: int) -> torch.Tensor:
    """Crops every index map to its window, resizes it (nearest-exact) and flips it where asked.

    Shapes:
        segment: (B, [T,] H, W) uint8, padded; windows: (B, 4) int64; flips: (B,) bool
            -> (B, [T,] R, R) uint8
    """
    device = segment.device
    top, left, rows, cols = windows.unbind(1)
    row_index = nearest_exact_index(top, rows, resolution, torch.zeros_like(flips)).to(device, non_blocking=True)
    col_index = nearest_exact_index(left, cols, resolution, flips).to(device, non_blocking=True)  # (B, R)
    batch, height, width = segment.shape[0], segment.shape[-2], segment.shape[-1]
    maps = segment.reshape(batch, -1, height, width)  # (B, T, H, W)
    frames = maps.shape[1]
    maps = maps.gather(2, row_index[:, None, :, None].expand(batch, frames, resolution, width))  # (B, T, R, W)
    maps = maps.gather(3, col_index[:, None, None, :].expand(batch, frames, resolution, resolution))
    return maps.reshape(*segment.shape[:-2], resolution, resolution)


def preprocess_batch(
    pixels: torch.Tensor,
    segment: torch.Tensor | None,
    windows: torch.Tensor,
    flips: torch.Tensor,
    resolution: int = 256,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`transforms.preprocess` of a whole batch, with the windows and flips drawn for its samples.

    Args:
        pixels: uint8 RGB images or clips, padded to a common size.
        segment: uint8 index maps of the same (padded) size, or None.
        windows: per sample, crop top, left, height, width.
        flips: per sample, flip horizontally.
        resolution: output side R.

    Shapes:
        pixels: (B, [T,] 3, H, W) uint8 -> (B, [T,] 3, R, R) float32, normalised
        segment: (B, [T,] H, W) uint8 -> (B, [T,] R, R) uint8
        windows: (B, 4) int64; flips: (B,) bool
    """
    images = normalize(resize_images(pixels, windows, flips, resolution))
    if segment is None:
        return images, None
    return images, resize_segments(segment, windows, flips, resolution)

"""Pictures of what the slots found: PNG grids for images, animated GIFs for videos (Pillow only).

Each row of a grid is one sample: the image, the ground-truth segments, the predicted segments (both as
colour overlays), then one tile per slot: the pixels the slot wins, the rest dimmed. `segmentation_picture`
draws one input of any size without ground truth (what `smoothsa.infer` writes), with a legend.

Shapes: B batch, T frames, H×W image, C ground-truth channels, S slots.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

# ImageNet statistics on the 0–255 scale, as the data pipeline normalises (docs/official.md §2.1).
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def palette(n: int) -> np.ndarray:
    """n well-separated colours (uint8, (n, 3)): golden-ratio hue steps at full saturation."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    h6 = hues * 6
    x = 1 - np.abs(h6 % 2 - 1)
    sector = h6.astype(int) % 6
    table = np.zeros((n, 3))
    order = [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)]
    for i in range(n):
        table[i] = [c[i] if isinstance(c, np.ndarray) else c for c in order[sector[i]]]
    return (table * 220 + 20).astype(np.uint8)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised float → (H, W, 3) uint8."""
    pixels = image.detach().float().cpu() * STD + MEAN
    return pixels.clamp(0, 255).round().byte().permute(1, 2, 0).numpy()


def overlay(rgb: np.ndarray, segments: torch.Tensor, alpha: float = 0.6) -> np.ndarray:
    """Colours each pixel by its segment. rgb (H, W, 3) uint8, segments (H, W, K) bool → (H, W, 3) uint8."""
    segments = segments.detach().cpu().bool()
    colours = palette(segments.shape[-1])
    index = segments.float().argmax(-1).numpy()
    labelled = segments.any(-1).numpy()[..., None]
    mixed = (1 - alpha) * rgb + alpha * colours[index]
    return np.where(labelled, mixed, rgb * 0.5).astype(np.uint8)


def slot_tiles(rgb: np.ndarray, pred: torch.Tensor, dim: float = 0.15) -> list[np.ndarray]:
    """One tile per slot: its pixels as they are, the others dimmed. pred (H, W, S) bool → S × (H, W, 3)."""
    masks = pred.detach().cpu().bool().numpy()
    return [(rgb * np.where(masks[..., s, None], 1.0, dim)).astype(np.uint8) for s in range(masks.shape[-1])]


def sample_row(image: torch.Tensor, true: torch.Tensor | None, pred: torch.Tensor) -> np.ndarray:
    """image (3, H, W), true (H, W, C) or None, pred (H, W, S) → (H, W·(3 + S), 3) uint8."""
    rgb = denormalize(image)
    blank = np.zeros_like(rgb)
    tiles = [rgb, overlay(rgb, true) if true is not None else blank, overlay(rgb, pred)] + slot_tiles(rgb, pred)
    return np.concatenate(tiles, axis=1)


def grid_array(images, true, pred, most: int = 8) -> np.ndarray:
    """One row per sample (up to `most`): images (B, 3, H, W); true (B, H, W, C) or None; pred (B, H, W, S)
    → (rows·H, W·(3 + S), 3) uint8."""
    rows = [sample_row(images[b], None if true is None else true[b], pred[b]) for b in range(min(most, len(images)))]
    return np.concatenate(rows, axis=0)


def save_image_grid(path: str | Path, images, true, pred, most: int = 8) -> Path:
    """PNG grid of up to `most` samples (see `grid_array`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_array(images, true, pred, most)).save(path)
    return path


def save_video_gif(path: str | Path, video, true, pred, most: int = 4, frame_ms: int = 250) -> Path:
    """Animated GIF, one grid per frame. video (B, T, 3, H, W); true (B, T, H, W, C) or None;
    pred (B, T, H, W, S)."""
    count = min(most, len(video))
    frames = []
    for t in range(video.shape[1]):
        rows = [sample_row(video[b, t], None if true is None else true[b, t], pred[b, t]) for b in range(count)]
        frames.append(Image.fromarray(np.concatenate(rows, axis=0)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return path


LEGEND_HEIGHT = 18


def _legend(width: int, label: str, colour: tuple[int, int, int] | None) -> Image.Image:
    """A strip under one tile: a colour swatch (when given) and a label."""
    strip = Image.new("RGB", (width, LEGEND_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    x = 3
    if colour is not None:
        draw.rectangle([x, 4, x + 9, 13], fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
        x += 14
    draw.text((x, 3), label, fill=(0, 0, 0))
    return strip


def segmentation_picture(rgb: np.ndarray, masks: np.ndarray, num_slots: int, height: int = 256) -> np.ndarray:
    """image | predicted segments | one tile per slot, each with a legend (slot colour, share of the pixels).

    rgb (H, W, 3) uint8 and masks (H, W) uint8 slot indices, shown at `height` pixels tall (aspect kept) →
    (height + LEGEND_HEIGHT, (2 + S)·w, 3) uint8.
    """
    h, w = masks.shape
    width = max(1, round(w * height / h))
    shown = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
    index = np.asarray(Image.fromarray(masks).resize((width, height), Image.NEAREST))
    one_hot = torch.tensor(index).long()[..., None] == torch.arange(num_slots)  # (height, width, S)
    tiles = [shown, overlay(shown, one_hot)] + slot_tiles(shown, one_hot)
    areas = np.bincount(masks.reshape(-1), minlength=num_slots) / masks.size
    colours = palette(num_slots)
    labels = [("input", None), ("segments", None)] + [(f"slot {s}: {areas[s]:.0%}", colours[s]) for s in range(num_slots)]
    legends = [np.asarray(_legend(width, label, colour)) for label, colour in labels]
    return np.concatenate([np.concatenate([t, l], axis=0) for t, l in zip(tiles, legends)], axis=1)


def save_segmentation_png(path: str | Path, rgb: np.ndarray, masks: np.ndarray, num_slots: int) -> Path:
    """`segmentation_picture` of one image as a PNG."""
    path = Path(path)
    Image.fromarray(segmentation_picture(rgb, masks, num_slots)).save(path)
    return path


def save_segmentation_gif(path: str | Path, frames: np.ndarray, masks: np.ndarray, num_slots: int,
                          frame_ms: int = 200) -> Path:
    """`segmentation_picture` of every frame as an animated GIF. frames (T, H, W, 3), masks (T, H, W) uint8."""
    path = Path(path)
    pictures = [Image.fromarray(segmentation_picture(f, m, num_slots)) for f, m in zip(frames, masks)]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0)
    return path

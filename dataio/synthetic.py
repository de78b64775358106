"""Synthetic multi-object scenes written in the official LMDB layouts (the demo and test default).

Scenes hold 2-6 flat-coloured circles, squares and triangles (distinct colours, sides of 1/8 to 1/3 of
the image, random rotation and occlusion order) on a plain or softly textured background, with exact
instance masks. Videos move the same kind of objects with constant velocities, bouncing off the
borders, and store per-frame boxes.

Records are readable by the matching official readers:
* images, ClevrTex/COCO layout: `image` PNG (or JPEG) bytes, `segment` PNG index map (0 = background,
  k = k-th object in drawing order), `clazz` (s,) uint8 shape ids (1 circle, 2 square, 3 triangle),
  `isthing` (s,) bool (all True). ClevrTex reads the background as mask channel 0; COCO treats
  index 0 as unannotated.
* videos, MOVi layout: `video` list of T PNGs written the way cv2 writes an RGB array (R and B swapped
  in the file), `segment` list of T PNG index maps, `s`, `bbox` (T, s, 4) float32 l, t, r, b in [0, 1]
  (0 where invisible), `clazz` (T, s) uint8. With `layout="ytvis"` frames are plain RGB JPEGs instead.

    python -m smoothsa.dataio.synthetic --dst data/synthetic --split train --num 1000
    python -m smoothsa.dataio.synthetic --dst data/synthetic_video --split val --num 100 --video
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from .records import LmdbWriter, encode_jpeg, encode_png

SHAPES = ("circle", "square", "triangle")
OBJECT_SIZE = (1 / 8, 1 / 3)  # object sides, as fractions of the shorter image side
# saturated, well-separated colours: objects must be told apart by colour alone at 16x16 tokens
PALETTE = np.array(
    [
        [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
        [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190], [0, 128, 128], [170, 110, 40],
    ],
    dtype=np.uint8,
)  # fmt: skip


def _shape_mask(
    kind: str, cy: float, cx: float, side: float, angle: float, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """Boolean mask of one shape of width `side` centred at (cy, cx), rotated by `angle`."""
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        return dy * dy + dx * dx <= (side / 2) ** 2
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # coordinates in the shape's frame
    if kind == "square":
        return (np.abs(u) <= side / 2) & (np.abs(v) <= side / 2)
    # equilateral triangle with circumradius side / sqrt(3): inside all three edge half-planes
    radius = side / np.sqrt(3)
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        normal = np.pi / 2 + 2 * np.pi * k / 3  # outward normal of edge k; the inradius is radius / 2
        inside &= np.cos(normal) * u + np.sin(normal) * v <= radius / 2
    return inside


def _background(rng: np.random.Generator, height: int, width: int, textured: bool) -> np.ndarray:
    """A muted background: plain grey-ish, or a low-frequency stripe/checker/blob texture."""
    base = rng.uniform(40, 120) + rng.uniform(-15, 15, size=3)
    image = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if textured:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        kind = rng.integers(3)
        freq = rng.uniform(2, 6) * 2 * np.pi / max(height, width)
        theta = rng.uniform(0, np.pi)
        if kind == 0:
            pattern = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy))
        elif kind == 1:
            pattern = np.sign(np.sin(freq * xx) * np.sin(freq * yy))
        else:
            coarse = rng.normal(size=(5, 5)).astype(np.float32)
            pattern = np.kron(coarse, np.ones((height // 5 + 1, width // 5 + 1), np.float32))[:height, :width]
        image = image + rng.uniform(10, 25) * pattern[..., None] * rng.uniform(0.6, 1.0, size=3)
    return np.clip(image, 0, 255).astype(np.uint8)


def _objects(
    rng: np.random.Generator, height: int, width: int, num_objects: tuple[int, int], object_size: tuple[float, float]
) -> list[dict]:
    count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    colours = rng.choice(len(PALETTE), size=count, replace=False)
    side = min(height, width)
    objects = []
    for colour in colours:
        size = rng.uniform(*object_size) * side
        objects.append(
            dict(
                kind=int(rng.integers(len(SHAPES))),
                colour=PALETTE[colour],
                size=size,
                angle=rng.uniform(0, 2 * np.pi),
                cy=rng.uniform(size / 2, height - size / 2),
                cx=rng.uniform(size / 2, width - size / 2),
            )
        )
    return objects


def _paint(
    objects: list[dict], background: np.ndarray, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Painter's algorithm: later objects occlude earlier ones. Returns image, index map, full masks."""
    image = background.copy()
    segment = np.zeros(background.shape[:2], np.uint8)
    full = []
    for k, obj in enumerate(objects):
        mask = _shape_mask(SHAPES[obj["kind"]], obj["cy"], obj["cx"], obj["size"], obj["angle"], yy, xx)
        image[mask] = obj["colour"]
        segment[mask] = k + 1
        full.append(mask)
    return image, segment, full


def render_scene(
    rng: np.random.Generator,
    height: int = 128,
    width: int = 128,
    num_objects: tuple[int, int] = (2, 6),
    textured: bool = True,
    min_visible: float = 0.5,
    object_size: tuple[float, float] = OBJECT_SIZE,
) -> dict:
    """One image scene with exact instance masks.

    Args:
        rng: numpy generator (the scene is a pure function of its state).
        height, width: image size.
        num_objects: inclusive range of the object count.
        textured: textured (else plain) background.
        min_visible: objects are re-placed (up to 20 tries) until each keeps this visible fraction.
        object_size: range of object sides as fractions of the shorter image side.

    Shapes:
        image (H, W, 3) uint8 RGB; segment (H, W) uint8, 0 = background, k = object k - 1;
        clazz (s,) uint8 shape ids 1..3
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    background = _background(rng, height, width, textured)
    for _ in range(20):
        objects = _objects(rng, height, width, num_objects, object_size)
        image, segment, full = _paint(objects, background, yy, xx)
        visible = [np.count_nonzero(segment == k + 1) / max(np.count_nonzero(m), 1) for k, m in enumerate(full)]
        if min(visible) >= min_visible:
            break
    clazz = np.array([obj["kind"] + 1 for obj in objects], np.uint8)
    return dict(image=image, segment=segment, clazz=clazz)


def render_video(
    rng: np.random.Generator,
    height: int = 128,
    width: int = 128,
    num_frames: int = 12,
    num_objects: tuple[int, int] = (2, 6),
    textured: bool = True,
    object_size: tuple[float, float] = OBJECT_SIZE,
) -> dict:
    """A clip of objects moving with constant velocity (bouncing off the borders) over a fixed background.

    Shapes:
        video (T, H, W, 3) uint8 RGB; segment (T, H, W) uint8 (0 = background, k = object k - 1);
        bbox (T, s, 4) float32 l, t, r, b in [0, 1] of the visible pixels (0 where invisible);
        clazz (T, s) uint8 shape ids
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    background = _background(rng, height, width, textured)
    objects = _objects(rng, height, width, num_objects, object_size)
    speed = min(height, width) / 40
    for obj in objects:
        heading = rng.uniform(0, 2 * np.pi)
        obj["vy"], obj["vx"] = speed * rng.uniform(0.5, 1.5) * np.array([np.sin(heading), np.cos(heading)])
        obj["spin"] = rng.uniform(-0.1, 0.1)
    frames, segments, boxes = [], [], []
    for _ in range(num_frames):
        image, segment, _ = _paint(objects, background, yy, xx)
        frames.append(image)
        segments.append(segment)
        boxes.append(_boxes(segment, len(objects)))
        for obj in objects:  # move, reflecting off the borders
            for axis, limit in (("y", height), ("x", width)):
                low, high = obj["size"] / 2, limit - obj["size"] / 2
                pos = obj["c" + axis] + obj["v" + axis]
                if pos < low or pos > high:
                    obj["v" + axis] = -obj["v" + axis]
                    pos = np.clip(pos, low, high)
                obj["c" + axis] = pos
            obj["angle"] += obj["spin"]
    clazz = np.array([obj["kind"] + 1 for obj in objects], np.uint8)
    return dict(
        video=np.stack(frames),
        segment=np.stack(segments),
        bbox=np.stack(boxes),
        clazz=np.tile(clazz, (num_frames, 1)),
    )


def _boxes(segment: np.ndarray, count: int) -> np.ndarray:
    """(count, 4) float32 l, t, r, b / (W, H, W, H) of each index 1..count; zeros when absent."""
    height, width = segment.shape
    boxes = np.zeros((count, 4), np.float32)
    for k in range(count):
        rows, cols = np.nonzero(segment == k + 1)
        if len(rows):
            boxes[k] = [cols.min() / width, rows.min() / height, cols.max() / width, rows.max() / height]
    return boxes


def image_record(scene: dict, image_format: Literal["png", "jpeg"] = "png") -> dict:
    """A rendered scene as an official image record (see the module docstring)."""
    image = scene["image"]
    encoded = encode_png(image).tobytes() if image_format == "png" else encode_jpeg(image)
    return dict(
        image=encoded,
        segment=encode_png(scene["segment"]),
        clazz=scene["clazz"],
        isthing=np.ones(len(scene["clazz"]), bool),
    )


def video_record(clip: dict, layout: Literal["movi", "ytvis"] = "movi") -> dict:
    """A rendered clip as an official video record (MOVi layout, or YTVIS with JPEG frames)."""
    if layout == "movi":
        # cv2.imencode treats arrays as BGR: the official MOVi files hold RGB frames written as such
        frames = [encode_png(frame[..., ::-1]) for frame in clip["video"]]
    else:
        frames = [encode_jpeg(frame) for frame in clip["video"]]
    return dict(
        video=frames,
        segment=[encode_png(segment) for segment in clip["segment"]],
        s=clip["bbox"].shape[1],
        bbox=clip["bbox"],
        clazz=clip["clazz"],
    )


def write_synthetic(
    dst: str | Path,
    split: str = "train",
    num: int = 1000,
    video: bool = False,
    height: int = 128,
    width: int = 128,
    num_frames: int = 12,
    num_objects: tuple[int, int] = (2, 6),
    textured: bool = True,
    image_format: Literal["png", "jpeg"] = "png",
    layout: Literal["movi", "ytvis"] = "movi",
    seed: int = 0,
    progress: bool = False,
    object_size: tuple[float, float] = OBJECT_SIZE,
) -> Path:
    """Writes `<dst>/<split>.lmdb` with `num` synthetic images (or clips); returns its path.

    Sample i is a pure function of (seed, split, i), so splits differ and files are reproducible.

    Args:
        dst: output folder.
        split: split name (file stem).
        num: number of samples.
        video: write clips (MOVi layout) instead of images.
        height, width: frame size.
        num_frames: frames per clip.
        num_objects: inclusive range of objects per scene.
        textured: textured backgrounds.
        image_format: "png" (ClevrTex-like) or "jpeg" (COCO-like) for images.
        layout: "movi" (PNG frames) or "ytvis" (JPEG frames) for videos.
        seed: base seed.
        progress: show a progress bar.
        object_size: range of object sides as fractions of the shorter image side.
    """
    path = Path(dst) / f"{split}.lmdb"
    split_id = zlib.crc32(split.encode())
    with LmdbWriter(path) as writer:
        for i in tqdm(range(num), desc=f"synthetic {split}", disable=not progress):
            rng = np.random.default_rng([seed, split_id, i])
            if video:
                clip = render_video(rng, height, width, num_frames, num_objects, textured, object_size)
                writer.append(video_record(clip, layout))
            else:
                scene = render_scene(rng, height, width, num_objects, textured, object_size=object_size)
                writer.append(image_record(scene, image_format))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dst", required=True, help="output folder; writes <dst>/<split>.lmdb")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--video", action="store_true", help="moving-object clips (MOVi layout)")
    parser.add_argument("--size", type=int, nargs="+", default=[128], help="side, or height width")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--objects", type=int, nargs=2, default=[2, 6], metavar=("MIN", "MAX"))
    parser.add_argument("--plain", action="store_true", help="plain backgrounds")
    parser.add_argument("--object-size", type=float, nargs=2, default=list(OBJECT_SIZE), metavar=("MIN", "MAX"),
                        help="object sides as fractions of the shorter image side")
    parser.add_argument("--jpeg", action="store_true", help="JPEG images / YTVIS-layout video frames")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    height, width = (args.size * 2)[:2]
    path = write_synthetic(
        args.dst, args.split, args.num, args.video, height, width, args.frames, tuple(args.objects),
        textured=not args.plain, image_format="jpeg" if args.jpeg else "png",
        layout="ytvis" if args.jpeg else "movi", seed=args.seed, progress=True, object_size=tuple(args.object_size),
    )  # fmt: skip
    print(path)


if __name__ == "__main__":
    main()

"""Your own images or videos, without labels: finding and reading them, converting a folder to the official
LMDB layout, and the readers that train on it (`--set data.dataset=folder`, or `folder_video`).

    python -m smoothsa.dataio.convert folder --src photos/ --dst data/photos               # images
    python -m smoothsa.dataio.convert folder --src clips/ --dst data/clips --video         # videos
    python -m smoothsa.train --preset smoothsa_r-coco --data data/photos --set data.dataset=folder

Images are found recursively (`IMAGE_EXTENSIONS`); with `--video`, every video file (`VIDEO_EXTENSIONS`, read
with PyAV: `pip install -e ".[video]"`) and every folder that holds image files (its frames, in natural order:
`frame2` before `frame10`) is one video. A seeded share of them (`--val-fraction`) goes to `val.lmdb`, the rest
to `train.lmdb`. Records hold the encoded files only (`image`, or `video`: one encoded frame per entry), so the
readers return pixels and no `segment`: validation on such data has losses but no segmentation metrics.
"""

from __future__ import annotations

import io
import random
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .datasets import Encoded, _ImageDataset, _VideoDataset
from .records import LmdbWriter, RecordError, encode_jpeg

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
VIDEO_EXTRA = 'reading video files needs PyAV, which is not installed: pip install -e ".[video]"'
_KEPT_FORMATS = ("JPEG", "PNG")  # stored as they are; other formats are re-encoded as PNG
_DIGITS = re.compile(r"(\d+)")


class UnreadableInput(ValueError):
    """A file that cannot be decoded as an image or a video; the message names it."""


def natural_key(path: Path) -> tuple:
    """Sort key that orders embedded numbers by value: `frame2` before `frame10`."""
    parts = _DIGITS.split(str(path))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def find_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, in natural order."""
    return sorted((p for p in root.rglob("*") if p.is_file() and is_image(p)), key=natural_key)


def find_videos(root: Path) -> list[Path]:
    """Videos under `root`, recursively: video files, and folders that directly hold image files (frames)."""
    files = [p for p in root.rglob("*") if p.is_file() and is_video(p)]
    folders = {p.parent for p in root.rglob("*") if p.is_file() and is_image(p)}
    return sorted(files + list(folders), key=natural_key)


def read_image(path: Path) -> np.ndarray:
    """An image file → (H, W, 3) uint8 RGB (grayscale replicated, alpha dropped)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as error:
        raise UnreadableInput(f"{path}: not a readable image ({type(error).__name__}: {error})") from None


def require_pyav():
    """The `av` module (PyAV), or an ImportError whose message names the `[video]` extra."""
    try:
        import av
    except ImportError:
        raise ImportError(VIDEO_EXTRA) from None
    return av


def read_video_file(path: Path) -> tuple[np.ndarray, float | None]:
    """A video file → frames (T, H, W, 3) uint8 RGB and its frame rate (None when the file does not say)."""
    av = require_pyav()
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except Exception as error:
        raise UnreadableInput(f"{path}: not a readable video ({type(error).__name__}: {error})") from None
    if not frames:
        raise UnreadableInput(f"{path}: the video has no frames")
    return np.stack(frames), rate


def frame_files(folder: Path) -> list[Path]:
    """The image files directly inside `folder`, in natural order: the frames of one video."""
    return sorted((p for p in folder.iterdir() if p.is_file() and is_image(p)), key=natural_key)


def read_video(path: Path) -> tuple[np.ndarray, float | None]:
    """A video file or a folder of frames → (T, H, W, 3) uint8 RGB and the frame rate (None for folders)."""
    if path.is_dir():
        frames = [read_image(p) for p in frame_files(path)]
        if not frames:
            raise UnreadableInput(f"{path}: the folder holds no image files")
        sizes = {f.shape for f in frames}
        if len(sizes) > 1:
            raise UnreadableInput(f"{path}: its frames differ in size ({sorted(sizes)})")
        return np.stack(frames), None
    return read_video_file(path)


# ------------------------------------------------------------------------------------------------
# conversion


def encoded_image(path: Path) -> bytes:
    """The file's bytes when it is a JPEG or PNG that decodes; other readable formats re-encoded as PNG."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format in _KEPT_FORMATS and image.mode in ("RGB", "L"):
                return data
            out = io.BytesIO()
            image.convert("RGB").save(out, format="PNG", compress_level=1)
            return out.getvalue()
    except Exception as error:
        raise UnreadableInput(f"{path}: not a readable image ({type(error).__name__}: {error})") from None


def image_record(path: Path) -> dict:
    return {"image": encoded_image(path)}


def video_record(path: Path) -> dict:
    """Frame folders keep their files (re-encoded only when not JPEG/PNG); video files become JPEG frames."""
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise UnreadableInput(f"{path}: the folder holds no image files")
        sizes = set()
        for p in files:
            with Image.open(p) as image:
                sizes.add(image.size)
        if len(sizes) > 1:
            raise UnreadableInput(f"{path}: its frames differ in size ({sorted(sizes)})")
        return {"video": [encoded_image(p) for p in files]}
    frames, _ = read_video_file(path)
    return {"video": [encode_jpeg(frame, quality=95) for frame in frames]}


def split_inputs(inputs: list[Path], val_fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """(train, val): a seeded random share `val_fraction` of the inputs (at least one, and never all) goes to
    val; both keep the inputs' order."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")
    if len(inputs) < 2:
        raise ValueError(f"found {len(inputs)} input(s); a train and a val split need at least 2")
    count = min(max(round(len(inputs) * val_fraction), 1), len(inputs) - 1)
    chosen = set(random.Random(seed).sample(range(len(inputs)), count))
    train = [p for i, p in enumerate(inputs) if i not in chosen]
    val = [p for i, p in enumerate(inputs) if i in chosen]
    return train, val


def _records(paths: list[Path], make, skipped: list[str]) -> Iterator[dict]:
    for path in paths:
        try:
            yield make(path)
        except UnreadableInput as error:
            print(f"warning: skipping {error}", file=sys.stderr)
            skipped.append(str(path))


def convert_folder(src: Path, dst: Path, val_fraction: float = 0.05, video: bool = False, seed: int = 0) -> list[Path]:
    """Writes `<dst>/train.lmdb` and `<dst>/val.lmdb` (official layout, atomically) from the images, or with
    `video` the videos, found under `src`. Unreadable files are named and skipped."""
    src, dst = Path(src), Path(dst)
    inputs = find_videos(src) if video else find_images(src)
    kind = "videos (video files or folders of frames)" if video else f"images ({', '.join(IMAGE_EXTENSIONS)})"
    if not inputs:
        raise ValueError(f"no {kind} under {src}")
    if video and any(p.is_file() for p in inputs):
        require_pyav()  # fail before writing anything
    train, val = split_inputs(inputs, val_fraction, seed)
    make = video_record if video else image_record
    written, skipped = [], []
    for split, paths in (("train", train), ("val", val)):
        path = dst / f"{split}.lmdb"
        with LmdbWriter(path) as writer:
            unit = "video" if video else "image"
            for record in tqdm(_records(paths, make, skipped), total=len(paths), desc=f"folder {split}", unit=unit):
                writer.append(record)
            if not writer.keys:
                raise ValueError(f"none of the {len(paths)} {split} inputs under {src} could be read")
        written.append(path)
    if skipped:
        print(f"skipped {len(skipped)} unreadable input(s)", file=sys.stderr)
    return written


# ------------------------------------------------------------------------------------------------
# readers


def _check_kind(dataset, expected: str, other: str, hint: str) -> None:
    if len(dataset.records) == 0:
        raise RecordError(f"{dataset.records.where()}: the split is empty")
    first = dataset.records.get(0)
    if expected not in first:
        found = other if other in first else f"fields {sorted(first)}"
        raise RecordError(f"{dataset.records.where(dataset.records.keys[0])}: holds {found}, not {expected}s; {hint}")


class FolderImages(_ImageDataset):
    """Unlabelled images written by `convert_folder`: returns {"image": (3, R, R) float32}, no `segment`.

    Args: path, is_training, resolution, name (as `LmdbDataset`).
    """

    name = "folder"

    def __init__(self, path: str | Path, is_training: bool = False, resolution: int = 256, name: str | None = None):
        super().__init__(path, is_training, resolution, with_segment=False, name=name)
        _check_kind(self, "image", "video",
                    "convert it without --video, or train a video preset on it with --set data.dataset=folder_video")

    def finish(
        self, encoded: Encoded, pixels: torch.Tensor, segment: torch.Tensor | None, present: torch.Tensor | None = None
    ) -> dict:
        return {"image": pixels}


class FolderVideos(_VideoDataset):
    """Unlabelled videos written by `convert_folder(video=True)`: returns {"video": (T, 3, R, R) float32}
    (T = clip_length in training, the whole video otherwise), no `segment`.

    Args: path, is_training, resolution, clip_length, name (as `_VideoDataset`).
    """

    name = "folder"

    def __init__(
        self, path: str | Path, is_training: bool = False, resolution: int = 256, clip_length: int | None = 5,
        name: str | None = None,
    ):
        super().__init__(path, is_training, resolution, clip_length, with_segment=False, name=name)
        _check_kind(self, "video", "image", "convert it with --video, or train an image preset on it")

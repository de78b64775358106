"""Readers of the official LMDB files: ClevrTex, COCO, VOC, MOVi-C/D/E, YTVIS (docs/official.md §6).

Every reader goes through the same three steps, so the torch and DALI loaders share them:

1. `encoded(index)` reads the record and keeps the encoded image bytes (for videos, the frames of the
   clip: a strided random slice in training), plus the fields the post-processing needs;
2. decoding + `transforms.preprocess` (crop, resize, flip, normalise), here with Pillow and torch
   (`planned` reads the record and draws the crop window and flip), in `dali.py` with DALI, in
   `device_loader.py` batched on the device;
3. `finish(encoded, pixels, segment)` turns the resized index map into boolean masks, channel last,
   keeping only the channels the crop left non-empty, and adds the optional `bbox` / `clazz`.

The registry of readers by dataset name is `registry.DATASETS`.

Shape alphabet: T frames, R output side (256), C mask channels, n objects.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from .records import LmdbRecords, RecordError, decode_index, decode_rgb, image_size
from .transforms import PAD_RULES, CropWindow, derive_seed, draw_params, preprocess, strided_clip_start


@dataclass
class Encoded:
    """One sample before decoding: where the torch and the DALI pipelines both start.

    Attributes:
        key: LMDB key of the record.
        location: dataset/split/key, for error messages.
        images: encoded frames (bytes or 1-D uint8 arrays): one for an image dataset, T for a clip.
        segments: encoded index maps aligned with `images`, or None.
        channels_reversed: frames were written by cv2 from RGB arrays (MOVi), so R and B are swapped.
        fields: the other stored values `finish` needs (`s`, `clazz`, `isthing`, ...).
    """

    key: bytes
    location: str
    images: list
    segments: list | None
    channels_reversed: bool = False
    fields: dict = field(default_factory=dict)


def _stacked(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays stacked on a new first axis; a single writable one is viewed, not copied (image datasets)."""
    return arrays[0][None] if len(arrays) == 1 and arrays[0].flags.writeable else np.stack(arrays)


# ------------------------------------------------------------------------------------------------
# mask post-processing


def masks_of(segment: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Boolean masks of the given indices, channel last (one-hot restricted to `ids`, in their order).

    Shapes:
        segment: (..., R, R) uint8 index map; ids: (C,), on any device -> (..., R, R, C) bool
    """
    # non_blocking: torch then does not synchronise the stream after the copy (that would wait for its queue)
    return segment[..., None] == ids.to(segment.device, segment.dtype, non_blocking=True)


def presence(segment: torch.Tensor) -> torch.Tensor:
    """Which of the 256 indices occur in `segment` (one sample; a batch: `index_presence`).

    Shapes:
        segment: (..., R, R) uint8 -> (256,) bool
    """
    return torch.bincount(segment.reshape(-1).long(), minlength=256) > 0


def present_ids(segment: torch.Tensor, drop: tuple[int, ...] = (), present: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices present anywhere in `segment` (the whole clip for videos), minus `drop`.

    Equivalent to the official one-hot followed by removing the channels the crop left empty.

    Args:
        present: which of the 256 indices occur in `segment`, when the caller has it already (the device
            path reads it for a whole batch at once, `index_presence`); the ids are then on its device.

    Shapes:
        segment: (..., R, R) uint8; present: (256,) bool -> (C,) int64
    """
    ids = torch.nonzero(presence(segment) if present is None else present).flatten()
    for value in drop:
        ids = ids[ids != value]
    return ids


def index_presence(segments: torch.Tensor) -> torch.Tensor:
    """Which of the 256 indices occur in each sample's index map(s), for a batch at once, in ops whose output
    shape does not depend on the data: on a GPU nothing waits until the caller reads the (B, 256) result.

    Shapes:
        segments: (B, ..., R, R) uint8 -> (B, 256) bool, on the same device
    """
    flat = segments.reshape(len(segments), -1).long()
    return torch.zeros(len(segments), 256, dtype=torch.bool, device=segments.device).scatter_(1, flat, True)


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes l, t, r, b of boolean masks (inclusive pixel indices) divided by W, H, W, H.

    Empty masks get the box (0, 0, 0, 0), as the official `mask_segment_to_bbox_np`.

    Shapes:
        masks: (..., H, W, n) bool -> (..., n, 4) float32
    """
    height, width = masks.shape[-3], masks.shape[-2]
    cols = masks.any(dim=-3)  # (..., W, n)
    rows = masks.any(dim=-2)  # (..., H, n)
    # argmax returns the first maximum: the first True index, or 0 for an empty mask
    left = cols.byte().argmax(dim=-2)
    right = width - 1 - cols.flip(-2).byte().argmax(dim=-2)
    top = rows.byte().argmax(dim=-2)
    bottom = height - 1 - rows.flip(-2).byte().argmax(dim=-2)
    boxes = torch.stack([left, top, right, bottom], dim=-1).float()  # (..., n, 4)
    boxes = boxes * cols.any(dim=-2)[..., None]  # zero the boxes of empty masks
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return boxes / scale.to(boxes.device, non_blocking=True)


# ------------------------------------------------------------------------------------------------
# base classes


class LmdbDataset(Dataset):
    """Common machinery of the readers: lazy LMDB access, decoding and the shared preprocessing.

    Args:
        path: the split file, e.g. `data/coco/val.lmdb`.
        is_training: random crop and flip (and, for videos, a random clip) when True.
        resolution: output side R.
        with_segment: decode and return `segment`.
        name: dataset name used in error messages (default: the class's).
    """

    name = "dataset"
    is_video = False
    pad_rules = PAD_RULES  # how `transforms.pad_collate` pads this reader's samples

    def __init__(
        self,
        path: str | Path,
        is_training: bool = False,
        resolution: int = 256,
        with_segment: bool = True,
        name: str | None = None,
    ):
        self.name = name or self.name
        self.records = LmdbRecords(path, dataset=self.name)
        self.is_training = is_training
        self.resolution = resolution
        self.with_segment = with_segment

    @property
    def pixel_key(self) -> str:
        return "video" if self.is_video else "image"

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys of the samples this reader returns."""
        return (self.pixel_key,) + ("segment",) * self.with_segment

    @property
    def location(self) -> str:
        """dataset/split, for messages."""
        return self.records.where()

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> tuple[bytes, dict]:
        """Key and stored dict of record `index`."""
        key = self.records.keys[index]
        return key, self.records.get(index)

    def required(self, sample: dict, key: bytes, name: str) -> Any:
        """`sample[name]`, or an error naming dataset, split, key and the missing field."""
        if name not in sample:
            raise RecordError(f"{self.records.where(key)}: the record has no field {name!r} (fields: {sorted(sample)})")
        return sample[name]

    def rngs(self, index: int, seed: int | None) -> tuple[torch.Generator | None, random.Random | None]:
        """Augmentation RNGs of sample `index`: torch (crop window) and Python (flip, clip start).

        With a seed (the loaders pass one per epoch) they are seeded by (seed, index), so a sample's
        crop, flip and clip do not depend on the worker that loads it and every backend agrees; without
        one (None) the augmentations draw from the global RNGs, like the official code.
        """
        if seed is None:
            return None, None
        value = derive_seed(seed, index)
        return torch.Generator().manual_seed(value), random.Random(value)

    def encoded(self, index: int, rng: random.Random | None = None) -> Encoded:
        """Reads sample `index`; `rng` draws the clip of a training video (default: `random`)."""
        raise NotImplementedError

    def decode(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decodes with Pillow.

        Shapes:
            -> pixels (3, H, W) or (T, 3, H, W) uint8 RGB; segment (H, W) or (T, H, W) uint8, or None
        """
        where = self.records.where
        frames = [
            decode_rgb(buffer, where(encoded.key, self.pixel_key), encoded.channels_reversed)
            for buffer in encoded.images
        ]
        pixels = torch.from_numpy(_stacked(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W)
        segment = None
        if encoded.segments is not None:
            maps = [decode_index(buffer, where(encoded.key, "segment")) for buffer in encoded.segments]
            segment = torch.from_numpy(_stacked(maps))  # (T, H, W)
            if segment.shape[-2:] != pixels.shape[-2:]:
                sizes = f"image is {tuple(pixels.shape[-2:])} but segment is {tuple(segment.shape[-2:])}"
                raise RecordError(f"{where(encoded.key)}: {sizes}")
        if not self.is_video:
            pixels = pixels[0]
            segment = segment[0] if segment is not None else None
        return pixels, segment

    def finish(
        self, encoded: Encoded, pixels: torch.Tensor, segment: torch.Tensor | None, present: torch.Tensor | None = None
    ) -> dict:
        """The sample's dict from its resized pixels and index map: masks, channel last (and boxes, classes).

        `present`: which of the 256 indices occur in `segment`, if the caller has it (`present_ids`)."""
        raise NotImplementedError

    def planned(self, index: int, seed: int | None = None) -> tuple[Encoded, CropWindow, bool]:
        """Sample `index` read but not decoded, with the clip, crop window and flip drawn for it from `seed` (in
        that order, as the official transforms draw them; the window fits the first frame's header size).
        Every loader starts here: `load` (the torch loader), the batched device path (`device_loader`) and
        DALI, so for one (seed, epoch) they augment every sample alike.
        """
        generator, rng = self.rngs(index, seed)
        encoded = self.encoded(index, rng)
        height, width = image_size(encoded.images[0], self.records.where(encoded.key, self.pixel_key))
        window, flip = draw_params(height, width, self.is_training, generator, rng)
        return encoded, window, flip

    def load(self, index: int, seed: int | None = None) -> dict:
        """Sample `index`, augmented (in training) with RNGs drawn from `seed` (see `rngs`)."""
        encoded, window, flip = self.planned(index, seed)
        pixels, segment = self.decode(encoded)
        pixels, segment = preprocess(pixels, segment, self.is_training, self.resolution, window, flip)
        return self.finish(encoded, pixels, segment)

    def __getitem__(self, index: int) -> dict:
        return self.load(index)


class _ImageDataset(LmdbDataset):
    def encoded(self, index: int, rng: random.Random | None = None) -> Encoded:
        key, sample = self.record(index)
        segments = [self.required(sample, key, "segment")] if self.with_segment else None
        fields = {name: sample[name] for name in ("clazz", "isthing") if name in sample}
        return Encoded(key, self.records.where(key), [self.required(sample, key, "image")], segments, False, fields)


class ClevrTex(_ImageDataset):
    """ClevrTex (train: `clevrtex_full`; val: the OOD set `clevrtex_outd`), see docs/official.md §6.

    Args: as `LmdbDataset`.
    """

    name = "clevrtex"

    def finish(
        self, encoded: Encoded, pixels: torch.Tensor, segment: torch.Tensor | None, present: torch.Tensor | None = None
    ) -> dict:
        """Shapes:
        image: (3, R, R) float32, normalised RGB
        segment: (R, R, C) bool, one channel per index left non-empty by the crop, in index order
            (channel 0 is the background when it is present)
        """
        out = {"image": pixels}
        if segment is not None:
            out["segment"] = masks_of(segment, present_ids(segment, present=present))
        return out

    def __getitem__(self, index: int) -> dict:
        """Returns {"image": (3, R, R) float32 normalised, "segment": (R, R, C) bool}; see `finish`."""
        return super().__getitem__(index)


class VOC(_ImageDataset):
    """PASCAL VOC object segmentation (train: VOC2012, val: VOC2007), see docs/official.md §6.

    Stored index 0 is the (224, 224, 192) boundary colour and is dropped; stored 1 is the black
    background, so the background is mask channel 0 whenever it is present.

    Args: as `LmdbDataset`.
    """

    name = "voc"

    def finish(
        self, encoded: Encoded, pixels: torch.Tensor, segment: torch.Tensor | None, present: torch.Tensor | None = None
    ) -> dict:
        out = {"image": pixels}
        if segment is not None:
            out["segment"] = masks_of(segment, present_ids(segment, drop=(0,), present=present))
        return out

    def __getitem__(self, index: int) -> dict:
        """Returns:
        image: (3, R, R) float32, normalised RGB
        segment: (R, R, C) bool, background first, then the objects left non-empty by the crop
        """
        return super().__getitem__(index)


class COCO(_ImageDataset):
    """COCO 2017 panoptic segments, see docs/official.md §6.

    Stored: `segment` index map (0 = unannotated, k = k-th panoptic segment by id), `clazz` (s,)
    category ids, `isthing` (s,) bool.

    Args:
        mode: "instance" (the official default, used by every official COCO config): all stuff OR-ed
            into one background channel placed first (possibly empty), followed by the thing channels;
            "panoptic": every segment is a channel (unannotated pixels in none).
        with_bbox: add `bbox`, boxes recomputed from the masks after the crop (needs `with_segment`).
        with_clazz: add `clazz`, the category ids (needs `with_segment`).
        (others as `LmdbDataset`)
    """

    name = "coco"

    def __init__(
        self,
        path: str | Path,
        is_training: bool = False,
        resolution: int = 256,
        mode: Literal["panoptic", "instance"] = "instance",
        with_segment: bool = True,
        with_bbox: bool = False,
        with_clazz: bool = False,
        name: str | None = None,
    ):
        if mode not in ("panoptic", "instance"):
            raise ValueError(f"mode must be 'panoptic' or 'instance', got {mode!r}")
        _needs_segment(with_segment, with_bbox=with_bbox, with_clazz=with_clazz)
        super().__init__(path, is_training, resolution, with_segment, name)
        self.mode = mode
        self.with_bbox = with_bbox
        self.with_clazz = with_clazz

    @property
    def keys(self) -> tuple[str, ...]:
        return super().keys + ("bbox",) * self.with_bbox + ("clazz",) * self.with_clazz

    def finish(
        self, encoded: Encoded, pixels: torch.Tensor, segment: torch.Tensor | None, present: torch.Tensor | None = None
    ) -> dict:
        if segment is None:
            return {"image": pixels}
        where = self.records.where(encoded.key)
        needed = ["isthing"] * (self.mode == "instance") + ["clazz"] * self.with_clazz
        for name in needed:
            if name not in encoded.fields:
                raise RecordError(f"{where}: this reader needs the field {name!r}, which the record lacks")
        clazz = torch.from_numpy(np.asarray(encoded.fields.get("clazz", np.zeros(0, np.uint8))))
        # The few ids are wanted on the host, where the stored fields are (no read of a device given `present`).
        ids = present_ids(segment, drop=(0,), present=present).cpu()
        for name in ("clazz", "isthing"):
            count = len(encoded.fields.get(name, ()))
            if name in encoded.fields and len(ids) and ids.max() > count:
                raise RecordError(f"{where}: segment index {int(ids.max())} but {name!r} lists {count} segments")
        if self.mode == "panoptic":
            objects = ids
            masks = masks_of(segment, ids)
            object_masks = masks
        else:
            thing = torch.from_numpy(np.asarray(encoded.fields["isthing"], dtype=bool))[ids - 1]
            objects = ids[thing]
            background = masks_of(segment, ids[~thing]).any(-1)  # (R, R): the stuff, OR-ed
            object_masks = masks_of(segment, objects)
            masks = torch.cat([background[..., None], object_masks], dim=-1)
        out = {"image": pixels, "segment": masks}
        if self.with_bbox:
            out["bbox"] = boxes_from_masks(object_masks)
        if self.with_clazz:
            out["clazz"] = clazz[objects - 1].to(torch.uint8)
        return out

    def __getitem__(self, index: int) -> dict:
        """Returns:
        image: (3, R, R) float32, normalised RGB
        segment: (R, R, C) bool. panoptic: the segments left non-empty by the crop, in stored order;
            instance: channel 0 = union of the stuff segments (may be all False), then the things
        bbox (with_bbox): (n, 4) float32 l, t, r, b in [0, 1] (inclusive pixel index / W or H) of the
            objects: every segment (panoptic) or the things, i.e. segment channels 1.. (instance)
        clazz (with_clazz): (n,) uint8 category ids of the same objects
        """
        return super().__getitem__(index)


# ------------------------------------------------------------------------------------------------
# videos


class _VideoDataset(LmdbDataset):
    """Clips of `clip_length` frames in training (strided random start), whole videos otherwise.

    Args:
        clip_length: frames per training clip (None: whole videos).
        with_bbox: add per-frame boxes recomputed from the masks.
        (others as `LmdbDataset`)
    """

    is_video = True
    channels_reversed = False

    def __init__(
        self,
        path: str | Path,
        is_training: bool = False,
        resolution: int = 256,
        clip_length: int | None = 6,
        with_segment: bool = True,
        with_bbox: bool = False,
        name: str | None = None,
    ):
        _needs_segment(with_segment, with_bbox=with_bbox)
        super().__init__(path, is_training, resolution, with_segment, name)
        self.clip_length = clip_length
        self.with_bbox = with_bbox
        self.index: list[int] = list(range(len(self.records)))

    @property
    def keys(self) -> tuple[str, ...]:
        return super().keys + ("bbox",) * self.with_bbox

    def __len__(self) -> int:
        return len(self.index)

    def encoded(self, index: int, rng: random.Random | None = None, start: int | None = None) -> Encoded:
        """Args:
        rng: Python RNG for drawing the clip start (default: the `random` module).
        start: first frame of the training clip, instead of drawing it.
        """
        key, sample = self.record(self.index[index])
        frames = self.required(sample, key, "video")
        frames = list(frames)
        clip = slice(None)
        if self.is_training and self.clip_length is not None:
            if start is None:
                start = strided_clip_start(len(frames), self.clip_length, rng)
            clip = slice(start, start + self.clip_length)
        segments = None
        if self.with_segment:
            segments = list(self.required(sample, key, "segment"))
            if len(segments) != len(frames):
                raise RecordError(f"{self.records.where(key)}: {len(frames)} frames but {len(segments)} segments")
            segments = segments[clip]
        fields = {name: sample[name] for name in ("s", "clazz") if name in sample}
        fields["clip"] = clip
        return Encoded(key, self.records.where(key), frames[clip], segments, self.channels_reversed, fields)

    def foreground(
        self, encoded: Encoded, segment: torch.Tensor, present: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask channels present in the clip (background id 0 first) and the foreground ids among them
        (`present`: as `present_ids`)."""
        ids = present_ids(segment, present=present)
        count = encoded.fields.get("s")
        if count is None and "clazz" in encoded.fields:
            count = np.asarray(encoded.fields["clazz"]).shape[-1]
        if count is not None and len(ids) and ids.max() > int(count):
            raise RecordError(f"{self.records.where(encoded.key)}: segment index {int(ids.max())} > s = {int(count)}")
        return ids, ids[ids != 0]

    def finish(
        self, encoded: Encoded, pixels: torch.Tensor, segment: torch.Tensor | None, present: torch.Tensor | None = None
    ) -> dict:
        out = {"video": pixels}
        if segment is None:
            return out
        ids, objects = self.foreground(encoded, segment, present)
        out["segment"] = masks_of(segment, ids)
        if self.with_bbox:
            # the stored boxes are never used (docs/official.md §6): boxes follow the masks after the crop
            out["bbox"] = boxes_from_masks(masks_of(segment, objects))
        return out


class MOVi(_VideoDataset):
    """MOVi-C / D / E (TFDS 256x256), see docs/official.md §6. Name it "movi_c", "movi_d" or "movi_e" for messages.

    Frames are PNGs written by cv2 from RGB arrays (R and B swapped in the file); they decode to RGB.

    Args: as `_VideoDataset` (clip_length 6 in the official configs).
    """

    name = "movi"
    channels_reversed = True
    pad_rules = {**PAD_RULES, "bbox": (-2, -1.0)}  # the official MOVi collate `ClPadTo1` pads boxes with -1

    def __getitem__(self, index: int) -> dict:
        """Returns:
        video: (T, 3, R, R) float32, normalised RGB (T = clip_length in training, all 24 frames otherwise)
        segment: (T, R, R, C) bool, channel 0 = background, then the objects present in the clip
        bbox (with_bbox): (T, C - 1, 4) float32 l, t, r, b in [0, 1] per frame, zeros where absent
        """
        return super().__getitem__(index)


class YTVIS(_VideoDataset):
    """YouTube-VIS 2022 and HQ-YTVIS, see docs/official.md §6.

    Args:
        clip_length: frames per training clip (5 in the official configs).
        repeat_every: in training, list each video `len // repeat_every` times when it is longer
            than `repeat_every` frames (the official `ts=30`); reads every record once at start-up.
        with_clazz: add the category ids of the tracks present in the clip.
        (others as `_VideoDataset`)
    """

    name = "ytvis"

    def __init__(
        self,
        path: str | Path,
        is_training: bool = False,
        resolution: int = 256,
        clip_length: int | None = 5,
        repeat_every: int | None = None,
        with_segment: bool = True,
        with_bbox: bool = False,
        with_clazz: bool = False,
        name: str | None = None,
    ):
        _needs_segment(with_segment, with_clazz=with_clazz)
        super().__init__(path, is_training, resolution, clip_length, with_segment, with_bbox, name)
        self.with_clazz = with_clazz
        if is_training and repeat_every:
            self.index = []
            for i in range(len(self.records)):
                length = len(self.records.get(i)["video"])
                self.index += [i] * (length // repeat_every if length > repeat_every else 1)
            self.records.close()  # opened in this process only to count; workers open their own

    @property
    def keys(self) -> tuple[str, ...]:
        return super().keys + ("clazz",) * self.with_clazz

    def finish(
        self, encoded: Encoded, pixels: torch.Tensor, segment: torch.Tensor | None, present: torch.Tensor | None = None
    ) -> dict:
        if self.with_clazz and segment is not None and present is None:
            present = presence(segment)  # once, for the masks and the classes
        out = super().finish(encoded, pixels, segment, present)
        if self.with_clazz and segment is not None:
            clazz = torch.from_numpy(np.asarray(self.required(encoded.fields, encoded.key, "clazz")))
            _, objects = self.foreground(encoded, segment, present)
            out["clazz"] = clazz[encoded.fields["clip"]][:, objects.cpu() - 1].to(torch.uint8)
        return out

    def __getitem__(self, index: int) -> dict:
        """Returns:
        video: (T, 3, R, R) float32, normalised RGB (T = clip_length in training, the whole video otherwise)
        segment: (T, R, R, C) bool, channel 0 = background, then the tracks present in the clip
        bbox (with_bbox): (T, C - 1, 4) float32 l, t, r, b in [0, 1] per frame, zeros where absent
        clazz (with_clazz): (T, C - 1) uint8 category ids of those tracks
        """
        return super().__getitem__(index)


def _needs_segment(with_segment: bool, **fields: bool) -> None:
    """Boxes and classes follow the masks after the crop, so they need the segments decoded."""
    wanted = [name for name, on in fields.items() if on]
    if wanted and not with_segment:
        raise ValueError(f"{', '.join(wanted)} need with_segment=True: boxes and classes follow the masks")

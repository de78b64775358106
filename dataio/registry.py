"""The registry of readers: `DATASETS` names the reader of every dataset, `open_dataset` builds one from a name
and the options that reader takes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from .datasets import COCO, VOC, YTVIS, ClevrTex, LmdbDataset, MOVi, _VideoDataset
from .folder import FolderImages, FolderVideos

# the reader of every dataset name (the synthetic scenes use the ClevrTex and MOVi layouts)
DATASETS: dict[str, type[LmdbDataset]] = {
    "clevrtex": ClevrTex,
    "coco": COCO,
    "voc": VOC,
    "movi_c": MOVi,
    "movi_d": MOVi,
    "movi_e": MOVi,
    "ytvis": YTVIS,
    "ytvis_hq": YTVIS,
    "synthetic": ClevrTex,
    "synthetic_video": MOVi,
    "folder": FolderImages,
    "folder_video": FolderVideos,
}


def open_dataset(
    name: str,
    path: str | Path,
    is_training: bool = False,
    resolution: int = 256,
    *,
    with_segment: bool = True,
    with_bbox: bool = False,
    with_clazz: bool = False,
    clip_length: int | None = None,
    repeat_every: int | None = None,
    coco_mode: Literal["panoptic", "instance"] = "instance",
) -> LmdbDataset:
    """The reader `DATASETS[name]` of one split file, given the options that reader takes.

    Args:
        name: a key of `DATASETS`; also the dataset name of error messages.
        path: the split file, e.g. `data/coco/val.lmdb`.
        is_training, resolution, with_segment: as `LmdbDataset`.
        with_bbox: COCO, MOVi, YTVIS: boxes from the masks (others: an error).
        with_clazz: COCO, YTVIS: category ids (others: an error).
        clip_length: videos: frames per training clip (None: whole videos); ignored unless training.
        repeat_every: YTVIS: the official `ts` repetition of long training videos (None: off).
        coco_mode: COCO: "instance" (every official config) or "panoptic".
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    reader = DATASETS[name]
    common = dict(is_training=is_training, resolution=resolution, with_segment=with_segment, name=name)
    if with_bbox and reader not in (COCO, MOVi, YTVIS):
        raise ValueError(f"{name}: this reader has no boxes (with_bbox)")
    if with_clazz and reader not in (COCO, YTVIS):
        raise ValueError(f"{name}: this reader has no classes (with_clazz)")
    if reader is FolderImages:  # unlabelled: pixels only, whatever else was asked for
        return FolderImages(path, is_training, resolution, name=name)
    if reader is FolderVideos:
        return FolderVideos(path, is_training, resolution, clip_length=clip_length if is_training else None, name=name)
    if reader is COCO:
        return COCO(path, mode=coco_mode, with_bbox=with_bbox, with_clazz=with_clazz, **common)
    if issubclass(reader, _VideoDataset):
        video = dict(clip_length=clip_length if is_training else None, with_bbox=with_bbox, **common)
        if reader is YTVIS:
            return YTVIS(path, repeat_every=repeat_every, with_clazz=with_clazz, **video)
        return reader(path, **video)
    return reader(path, **common)

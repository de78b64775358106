"""LMDB datasets, converters, transforms and loaders for SmoothSA (`smoothsa.dataio`).

    from smoothsa.dataio import COCO, make_loader
    train = COCO("data/coco/train.lmdb", is_training=True)
    loader = make_loader(train, batch_size=32, is_training=True, num_workers=4, seed=42)  # backend="dali"
    for batch in loader:
        batch["image"]    # (B, 3, 256, 256) float32, normalised
        batch["segment"]  # (B, 256, 256, C) bool, channel last, padded with False

Modules: `records` (LMDB access, safe unpickling, atomic writer), `datasets` (readers), `transforms`
(crop / resize / flip / normalise, collate), `loader` (torch and DALI loaders), `dali` (optional DALI
pipeline), `synthetic` (synthetic scenes in the official layout), `convert` (original layouts -> LMDB),
`folder` (your own unlabelled images and videos).
"""

from .datasets import COCO, DATASETS, MOVi, VOC, YTVIS, ClevrTex, Encoded, LmdbDataset
from .folder import FolderImages, FolderVideos
from .loader import TorchLoader, make_loader
from .records import LmdbRecords, LmdbWriter, RecordError, write_records
from .synthetic import render_scene, render_video, write_synthetic
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropWindow,
    center_crop_window,
    pad_collate,
    preprocess,
    random_crop_window,
)

__all__ = [
    "COCO",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClevrTex",
    "CropWindow",
    "Encoded",
    "FolderImages",
    "FolderVideos",
    "LmdbDataset",
    "LmdbRecords",
    "LmdbWriter",
    "MOVi",
    "RecordError",
    "TorchLoader",
    "VOC",
    "YTVIS",
    "center_crop_window",
    "make_loader",
    "pad_collate",
    "preprocess",
    "random_crop_window",
    "render_scene",
    "render_video",
    "write_records",
    "write_synthetic",
]

"""LMDB datasets, converters, transforms and loaders for SmoothSA (`smoothsa.dataio`).

    from smoothsa.dataio import LoaderOptions, default_workers, make_loader, open_dataset
    train = open_dataset("coco", "data/coco/train.lmdb", is_training=True)
    loader = make_loader(train, LoaderOptions(batch_size=32, workers=default_workers(), seed=42))
    # backend="torch-gpu", device_id=0: the workers only decode, the rest runs batched on cuda:0; or "dali"
    for batch in loader:
        batch["image"]    # (B, 3, 256, 256) float32, normalised
        batch["segment"]  # (B, 256, 256, C) bool, channel last, padded with False

Modules: `records` (LMDB access, safe unpickling, strict PNG decoding, atomic writer), `datasets` (readers),
`registry` (`DATASETS`, `open_dataset`), `transforms` (crop / resize / flip / normalise, collate), `epochs` (loader
options, epoch order, worker seeding, resume), `loader` (torch, torch-gpu and DALI loaders), `device_loader` (the
torch-gpu loader's worker and device halves), `device_transforms` (its batched crop / resize / flip /
normalise), `workers` (default worker count), `dali` (optional DALI pipeline), `synthetic` (synthetic scenes in the
official layout), `convert` (original layouts -> LMDB), `folder` (your own unlabelled images and videos).
"""

from .datasets import COCO, MOVi, VOC, YTVIS, ClevrTex, Encoded, LmdbDataset
from .folder import FolderImages, FolderVideos
from .registry import DATASETS, open_dataset
from .epochs import BACKENDS, EpochLoader, LoaderOptions, epoch_order
from .loader import DeviceLoader, TorchLoader, make_loader
from .device_loader import RawBatch
from .device_transforms import preprocess_batch
from .workers import default_workers
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
    "BACKENDS",
    "COCO",
    "DATASETS",
    "DeviceLoader",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClevrTex",
    "CropWindow",
    "Encoded",
    "EpochLoader",
    "FolderImages",
    "FolderVideos",
    "LmdbDataset",
    "LmdbRecords",
    "LmdbWriter",
    "LoaderOptions",
    "MOVi",
    "RawBatch",
    "RecordError",
    "TorchLoader",
    "VOC",
    "YTVIS",
    "center_crop_window",
    "default_workers",
    "epoch_order",
    "make_loader",
    "open_dataset",
    "pad_collate",
    "preprocess",
    "preprocess_batch",
    "random_crop_window",
    "render_scene",
    "render_video",
    "write_records",
    "write_synthetic",
]

"""From a preset's `DataConfig` and a data folder to the datasets and loaders of its splits.

A data folder holds one LMDB file per split, `<dir>/train.lmdb` and `<dir>/val.lmdb`, in the official layout
(SPEC §6); `python -m smoothsa.dataio.convert` writes them from the original datasets, and
`python -m smoothsa.dataio.synthetic` writes synthetic ones.
"""
from pathlib import Path

from smoothsa.dataio import COCO, VOC, ClevrTex, FolderImages, FolderVideos, MOVi, YTVIS, make_loader
from smoothsa.presets import Preset

SPLITS = ("train", "val")
DATASETS = ("clevrtex", "coco", "voc", "movi_c", "movi_d", "movi_e", "ytvis", "ytvis_hq", "synthetic", "synthetic_video",
            "folder")


def split_path(root: str | Path, split: str) -> Path:
    path = Path(root) / f"{split}.lmdb"
    if not path.exists():
        raise FileNotFoundError(
            f"no {split} split at {path}: a data folder holds train.lmdb and val.lmdb (official layout); "
            "convert the original dataset with `python -m smoothsa.dataio.convert` or make synthetic data with "
            "`python -m smoothsa.dataio.synthetic`"
        )
    return path


def build_dataset(preset: Preset, root: str | Path, split: str, is_training: bool):
    """The reader of one split. Validation videos are whole (no clip); training clips are `clip_len` long."""
    data = preset.data
    path = split_path(root, split)
    resolution = preset.model.image_size
    name = data.dataset
    if name in ("clevrtex", "synthetic"):
        return ClevrTex(path, is_training, resolution, name=name)
    if name == "voc":
        return VOC(path, is_training, resolution)
    if name == "coco":
        return COCO(path, is_training, resolution, mode=data.coco_mode, with_bbox=data.with_bbox, with_clazz=data.with_clazz)
    clip = data.clip_len if is_training else None
    if name == "folder":  # unlabelled images or videos (`python -m smoothsa.dataio.convert folder`)
        if data.with_bbox or data.with_clazz:
            raise ValueError(f"preset {preset.name} needs boxes or classes, which folder data has none of; "
                             "use a preset without them (e.g. smoothsa_r-coco, smoothsav_r-ytvis)")
        if preset.model.arch == "smoothsa_video":
            return FolderVideos(path, is_training, resolution, clip_length=clip)
        return FolderImages(path, is_training, resolution)
    if name.startswith("movi") or name == "synthetic_video":
        return MOVi(path, is_training, resolution, clip_length=clip, with_bbox=data.with_bbox, name=name)
    if name.startswith("ytvis"):
        return YTVIS(
            path, is_training, resolution, clip_length=clip, repeat_every=data.repeat_long or None,
            with_bbox=data.with_bbox, with_clazz=data.with_clazz, name=name,
        )
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def build_loader(preset: Preset, root, split: str, is_training: bool, batch_size: int, num_workers: int = 0,
                 backend: str = "torch", seed: int = 0, rank: int = 0, world_size: int = 1, device_id=None):
    dataset = build_dataset(preset, root, split, is_training)
    return make_loader(
        dataset, batch_size, is_training, num_workers=num_workers, seed=seed, backend=backend,
        drop_last=is_training, device_id=device_id, rank=rank, world_size=world_size,
    )

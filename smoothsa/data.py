"""From a preset's `DataConfig` and a data folder to the readers and loaders of its splits.

    from smoothsa.data import LoaderOptions, build_loader
    loader = build_loader(preset, "data/coco", "train", LoaderOptions(batch_size=32, workers=4, keys=("image",)))

A data folder holds one LMDB file per split, `<dir>/train.lmdb` and `<dir>/val.lmdb`, in the official layout
(docs/official.md §6); `python -m smoothsa.dataio.convert` writes them from the original datasets, and
`python -m smoothsa.dataio.synthetic` writes synthetic ones. The reader of each dataset name is
`smoothsa.dataio.DATASETS`.
"""
from pathlib import Path
from typing import Sequence

from smoothsa.dataio import LoaderOptions, LmdbDataset, make_loader, open_dataset
from smoothsa.presets import Preset

__all__ = ["LoaderOptions", "build_dataset", "build_loader", "split_path"]

SPLITS = ("train", "val")


def split_path(root: str | Path, split: str) -> Path:
    path = Path(root) / f"{split}.lmdb"
    if not path.exists():
        raise FileNotFoundError(
            f"no {split} split at {path}: a data folder holds train.lmdb and val.lmdb (official layout); "
            "convert the original dataset with `python -m smoothsa.dataio.convert` or make synthetic data with "
            "`python -m smoothsa.dataio.synthetic`"
        )
    return path


def build_dataset(preset: Preset, root: str | Path, split: str, is_training: bool,
                  keys: Sequence[str] | None = None) -> LmdbDataset:
    """The reader of one split. Validation videos are whole (no clip); training clips are `clip_len` long.

    keys: the sample keys wanted (None: all the preset's); segments are decoded only when a key needs them.
    """
    data = preset.data
    wanted = lambda key: keys is None or key in keys  # noqa: E731
    with_bbox = data.with_bbox and wanted("bbox")
    with_clazz = data.with_clazz and wanted("clazz")
    return open_dataset(
        data.dataset, split_path(root, split), is_training, preset.model.image_size,
        with_segment=wanted("segment") or with_bbox or with_clazz, with_bbox=with_bbox, with_clazz=with_clazz,
        clip_length=data.clip_len, repeat_every=data.repeat_long or None, coco_mode=data.coco_mode,
    )


def build_loader(preset: Preset, root: str | Path, split: str, options: LoaderOptions,
                 is_training: bool | None = None):
    """The loader of one split of a data folder: shuffled and augmented when training (default: the "train"
    split trains, the others do not); batches carry `options.keys` (default: every key the preset loads).

    Raises ValueError when the split holds no samples (nothing to train or evaluate on).
    """
    training = split == "train" if is_training is None else is_training
    return make_loader(build_dataset(preset, root, split, training, options.keys), options)

"""Batch loaders: torch DataLoader, torch-gpu (`device_loader`) or DALI, yielding the same batch dict (switch
with one option).

    loader = make_loader(COCO("data/coco/train.lmdb", is_training=True), LoaderOptions(batch_size=32, workers=4))
    for epoch in range(epochs):
        for batch in loader:          # each pass is a new epoch: new order, new augmentations
            batch["image"], batch["segment"]

Batch dict (B batch, T frames, C mask channels padded to the batch maximum, n objects):
    image   (B, 3, 256, 256) float32 normalised   | video (B, T, 3, 256, 256)
    segment (B, 256, 256, C) bool, channel last   | (B, T, 256, 256, C); padded channels are all False
    bbox    (B, n, 4) | (B, T, n, 4) float32 l, t, r, b in [0, 1]; padded objects are 0 (MOVi: -1)
    clazz   (B, n) | (B, T, n) uint8; padded objects are 0

Order, augmentations and resuming: see `epochs`.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import LmdbDataset
from .device_loader import RawBatch, RawSamples, fetched, transform_raw
from .epochs import EpochLoader, EpochView, LoaderOptions, SideStream, augment_seed, seed_worker, single_threaded
from .transforms import derive_seed, pad_collate


class TorchLoader(EpochLoader):
    """Iterating yields one epoch of padded batches (Pillow decoding, torch transforms); each pass is a
    new epoch. Args: as `epochs.EpochLoader` (`options.workers` DataLoader processes, `options.pin_memory`)."""

    @property
    def pin_memory(self) -> bool:
        """Whether the DataLoader pins what its workers hand over."""
        return self.options.pin_memory

    def epoch_samples(self, seed: int) -> Dataset:
        """What the workers index in one epoch (augmentation seed `seed`): the samples, with `keys` only."""
        return EpochView(self.dataset, seed, self.keys)

    def collate_fn(self) -> Callable:
        """What the workers make of a list of samples: the batch."""
        return partial(pad_collate, pad_rules=self.dataset.pad_rules)

    def __iter__(self) -> Iterator:
        epoch, _, order = self._start_epoch()
        workers = self.options.workers
        loader = DataLoader(
            self.epoch_samples(augment_seed(self.seed, epoch)),  # copied into the workers
            batch_size=self.batch_size,
            sampler=order,
            num_workers=workers,
            collate_fn=self.collate_fn(),
            pin_memory=self.pin_memory,
            drop_last=self.drop_last,
            worker_init_fn=partial(seed_worker, seed=self.seed, epoch=epoch) if workers else None,
            # Without its own generator a DataLoader draws its base seed from the global torch RNG when an
            # epoch starts, which the model's own draws (decoder masks) would then depend on.
            generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.options.rank)),
            persistent_workers=False,  # workers carry the epoch's seeds, so they are re-created per epoch
        )
        if workers:
            yield from loader
            return
        batches = iter(loader)
        while True:  # loading runs in this process: single-threaded, but never across the yield
            with single_threaded():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch


class DeviceLoader(TorchLoader):
    """The `torch-gpu` loader (`device_loader`): iterating yields one epoch of padded batches whose workers only
    decode, transformed on the device; each pass is a new epoch.

    Args: as `epochs.EpochLoader` (same seed, order, augmentations and resuming as the `torch` loader);
        `options.workers` DataLoader processes that decode, `options.device_id` the CUDA device where the
        batches are transformed and returned (None: the CPU, in this process). On CUDA the uint8 batches
        are pinned.
    """

    def __init__(self, dataset: LmdbDataset, options: LoaderOptions):
        super().__init__(dataset, options)
        self.device = torch.device("cpu") if options.device_id is None else torch.device("cuda", options.device_id)
        self.side = SideStream(self.device) if self.device.type == "cuda" else None  # where the device part runs
        # the index maps travel only when a key is made from them (masks, boxes, classes)
        self.with_segment = dataset.with_segment and any(key != dataset.pixel_key for key in self.keys)

    @property
    def pin_memory(self) -> bool:
        return self.options.pin_memory or self.device.type == "cuda"

    def epoch_samples(self, seed: int) -> RawSamples:
        return RawSamples(self.dataset, seed, self.with_segment)

    def collate_fn(self) -> Callable:
        return fetched

    def raw_batches(self) -> Iterator[RawBatch]:
        """The next epoch as the workers hand it over (pinned on CUDA), before the device part."""
        return super().__iter__()

    def __iter__(self) -> Iterator[dict]:
        for raw in self.raw_batches():
            with self.side or nullcontext():
                batch = transform_raw(self.dataset, raw, self.device, self.keys)
            yield self.side.hand_over(batch) if self.side else batch


def make_loader(dataset: LmdbDataset, options: LoaderOptions) -> EpochLoader:
    """The loader of one split; every backend yields the same batch dict (see the module docstring).

    Args:
        dataset: an LMDB reader (`ClevrTex`, `COCO`, `VOC`, `MOVi`, `YTVIS`); training readers shuffle
            and augment (random crop, flip, clip), the others do not.
        options: batch size, backend, seed, ranks, keys (see `LoaderOptions`).

    Returns:
        an iterable of batch dicts with `__len__` and `set_epoch`.

    Raises:
        ValueError: the split holds no samples, or `options.keys` asks for a key the reader lacks.
    """
    if len(dataset) == 0:
        raise ValueError(
            f"{dataset.location}: the split holds no samples; convert the dataset again "
            "(python -m smoothsa.dataio.convert) or point to the right data folder"
        )
    if options.backend == "dali":
        from .dali import DaliLoader  # optional dependency, imported only when asked for

        return DaliLoader(dataset, options)
    if options.backend == "torch-gpu":
        return DeviceLoader(dataset, options)
    return TorchLoader(dataset, options)

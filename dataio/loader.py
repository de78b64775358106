"""Batch loaders: torch DataLoader or DALI, yielding the same batch dict (switch with one flag).

    loader = make_loader(dataset, batch_size=32, is_training=True, num_workers=4, seed=42)
    for epoch in range(epochs):
        for batch in loader:          # each pass is a new epoch: new order, new augmentations
            batch["image"], batch["segment"]

Batch dict (B batch, T frames, C mask channels padded to the batch maximum, n objects):
    image   (B, 3, 256, 256) float32 normalised   | video (B, T, 3, 256, 256)
    segment (B, 256, 256, C) bool, channel last   | (B, T, 256, 256, C); padded channels are all False
    bbox    (B, n, 4) | (B, T, n, 4) float32 l, t, r, b in [0, 1]; padded objects are -1
    clazz   (B, n) | (B, T, n) uint8; padded objects are 0

Randomness: epoch e of a loader with base seed s shuffles with `derive_seed(s, e)` and sample i draws
its crop, flip and clip from `derive_seed(derive_seed(s, e), i)`, whichever worker loads it. The
official code re-seeded every worker with the same seed at every epoch (identical augmentations in
all workers, repeated each epoch, docs/official.md §10.9); here each (seed, epoch, worker) also gets its own
global seeds for anything else a worker might draw.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from functools import partial
from typing import Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from .datasets import LmdbDataset
from .transforms import derive_seed, pad_collate


def epoch_order(size: int, seed: int, epoch: int, shuffle: bool, rank: int = 0, world_size: int = 1) -> list[int]:
    """Sample order of one epoch for one rank: a seeded permutation in training, 0..size-1 otherwise.

    With several ranks every rank draws the same permutation, pads it by wrapping around to a multiple
    of `world_size` (as `DistributedSampler`) and takes every `world_size`-th sample from `rank` on.
    """
    order = list(range(size))
    if shuffle:
        generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
        order = torch.randperm(size, generator=generator).tolist()
    if world_size == 1 or size == 0:
        return order
    total = math.ceil(size / world_size) * world_size
    order = (order * math.ceil(total / size))[:total]
    return order[rank::world_size]


@contextmanager
def single_threaded() -> Iterator[None]:
    """Runs the block with one intra-op thread, as DataLoader workers do.

    Per-sample ops (256x256 masks, small resizes) are too small to gain from intra-op threads, and a
    parallel region stalls for milliseconds whenever another process holds one of the cores; loading
    in the main process (0 workers, DALI host work) would otherwise slow down 10x on a busy machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def seed_worker(worker: int, seed: int, epoch: int) -> None:
    """DataLoader `worker_init_fn`: distinct global seeds for every (seed, epoch, worker)."""
    value = derive_seed(seed, epoch, worker)
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)


class EpochLoader:
    """What the torch and DALI loaders share: the epoch counter, resuming mid-epoch, the shard size.

    Args:
        dataset: one of the LMDB readers (or any map-style dataset of sample dicts).
        batch_size: samples per batch.
        is_training: shuffle (seeded per epoch); the dataset's own flag decides the augmentations.
        seed: base seed of the order and the augmentations.
        drop_last: drop the last incomplete batch.
        rank, world_size: this process's share of every epoch (see `epoch_order`).
    """

    def __init__(
        self, dataset, batch_size: int, is_training: bool, seed: int, drop_last: bool, rank: int, world_size: int
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.is_training = is_training
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The epoch the next pass will be (passes count up from there); that pass starts after its first
        `skip_batches` batches, so a resumed run sees exactly the batches it had not seen yet."""
        self.epoch = epoch
        self.skip_batches = skip_batches

    def __len__(self) -> int:
        full, rest = divmod(math.ceil(len(self.dataset) / self.world_size), self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def _start_epoch(self) -> tuple[int, int, list[int]]:
        """Advances to the next epoch: its number, the batches skipped, and the sample order after them."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        skip, self.skip_batches = min(self.skip_batches, len(self)), 0
        order = epoch_order(len(self.dataset), self.seed, epoch, self.is_training, self.rank, self.world_size)
        return epoch, skip, order[skip * self.batch_size :]


class TorchLoader(EpochLoader):
    """Iterating yields one epoch of padded batches; each pass is a new epoch.

    Args: as `EpochLoader`, plus
        num_workers: DataLoader worker processes (0: load in this process).
        pin_memory: pin host memory (faster host-to-GPU copies).
    """

    def __init__(
        self,
        dataset: LmdbDataset,
        batch_size: int,
        is_training: bool,
        num_workers: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(dataset, batch_size, is_training, seed, drop_last, rank, world_size)
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def __iter__(self) -> Iterator[dict]:
        epoch, _, order = self._start_epoch()
        if hasattr(self.dataset, "augment_seed"):
            self.dataset.augment_seed = derive_seed(self.seed, epoch)  # copied into the workers below
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=order,
            num_workers=self.num_workers,
            collate_fn=pad_collate,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last,
            worker_init_fn=partial(seed_worker, seed=self.seed, epoch=epoch) if self.num_workers else None,
            # Without its own generator a DataLoader draws its base seed from the global torch RNG when an
            # epoch starts, which the model's own draws (decoder masks) would then depend on.
            generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank)),
            persistent_workers=False,  # workers carry the epoch's seeds, so they are re-created per epoch
        )
        if self.num_workers:
            yield from loader
            return
        batches = iter(loader)
        while True:  # loading runs in this process: single-threaded, but never across the yield
            with single_threaded():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch


def make_loader(
    dataset: LmdbDataset,
    batch_size: int,
    is_training: bool,
    num_workers: int = 0,
    seed: int = 0,
    backend: Literal["torch", "dali"] = "torch",
    drop_last: bool = False,
    device_id: int | None = None,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
):
    """The loader of one split; both backends yield the same batch dict (see the module docstring).

    Args:
        dataset: an LMDB reader (`ClevrTex`, `COCO`, `VOC`, `MOVi`, `YTVIS`) built with the same
            `is_training`.
        batch_size: samples per batch.
        is_training: shuffle and augment (random crop, flip, clip) when True.
        num_workers: torch: DataLoader worker processes; dali: CPU threads of the pipeline.
        seed: base seed (module docstring).
        backend: "torch" (Pillow + torch transforms in workers) or "dali" (DALI decoding and
            transforms; on GPU `device_id`, on the CPU with `device_id=None`).
        drop_last: drop the last incomplete batch.
        device_id: dali only: CUDA device of the pipeline (None: CPU).
        pin_memory: torch only: pin batches in host memory.
        rank, world_size: distributed training: this process loads every `world_size`-th sample of
            the epoch's order from `rank` on (the order is padded by wrap-around to a multiple).

    Returns:
        an iterable of batch dicts with `__len__` and `set_epoch`.
    """
    if getattr(dataset, "is_training", is_training) != is_training:
        raise ValueError(
            f"the dataset was built with is_training={dataset.is_training} but the loader with "
            f"is_training={is_training}: augmentations and shuffling would disagree"
        )
    if backend == "torch":
        return TorchLoader(dataset, batch_size, is_training, num_workers, seed, drop_last, pin_memory, rank, world_size)
    if backend == "dali":
        from .dali import DaliLoader  # optional dependency, imported only when asked for

        threads = max(num_workers, 1)
        return DaliLoader(dataset, batch_size, is_training, threads, seed, drop_last, device_id, rank, world_size)
    raise ValueError(f"backend must be 'torch' or 'dali', got {backend!r}")

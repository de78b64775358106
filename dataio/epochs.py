"""What every loader backend shares: its options, the epoch order, worker seeding and mid-epoch resume.

Randomness: epoch e of a loader with base seed s shuffles with `derive_seed(s, e)` and sample i draws
its crop, flip and clip from `derive_seed(derive_seed(s, e), i)` (the epoch's augmentation seed, handed
to the reader with every index), whichever worker loads it. The official code re-seeded every worker
with the same seed at every epoch (identical augmentations in all workers, repeated each epoch,
docs/official.md §10.9); here each (seed, epoch, worker) also gets its own global seeds for anything
else a worker might draw.
"""

from __future__ import annotations

import math
import random
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import derive_seed
from .workers import keep_freed_memory

BACKENDS = ("torch", "torch-gpu", "dali")


@dataclass(frozen=True)
class LoaderOptions:
    """How a split is loaded; the reader's own `is_training` decides shuffling and augmentations.

    Attributes:
        batch_size: samples per batch (per process).
        workers: torch, torch-gpu: DataLoader worker processes (0: load in this process;
            `workers.default_workers()` is one per usable CPU but one); dali: CPU threads.
        backend: "torch" (Pillow + torch transforms in the workers), "torch-gpu" (the workers only decode
            with Pillow; crop, resize, flip, normalise and masks run batched on `device_id`, in this
            process) or "dali" (DALI decoding and transforms).
        seed: base seed of the order and the augmentations (module docstring).
        rank, world_size: this process's share of every epoch (see `epoch_order`).
        device_id: the CUDA device of the dali pipeline or of the torch-gpu transforms, where their
            batches come back (None: the CPU).
        pin_memory: torch: pin batches in host memory (torch-gpu pins its uint8 batches whenever
            `device_id` is set).
        keys: the batch keys to carry (e.g. ("image",) for training a discovery model); None: every key
            the reader produces. Fields no key needs are not decoded.
        drop_last: drop the last incomplete batch; None: drop it when the reader is training.
    """

    batch_size: int = 1
    workers: int = 0
    backend: str = "torch"
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    device_id: int | None = None
    pin_memory: bool = False
    keys: tuple[str, ...] | None = None
    drop_last: bool | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 or more, got {self.workers}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside 0..{self.world_size - 1}")
        if self.keys is not None:
            object.__setattr__(self, "keys", tuple(self.keys))


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


def augment_seed(seed: int, epoch: int) -> int:
    """The augmentation seed of one epoch, handed to the reader with every index it loads."""
    return derive_seed(seed, epoch)


def seed_worker(worker: int, seed: int, epoch: int) -> None:
    """DataLoader `worker_init_fn`: distinct global seeds for every (seed, epoch, worker). Workers ignore SIGINT
    and SIGTERM (a Ctrl-C reaches the whole process group): the main process decides when to stop, finishes
    the step in flight and shuts them down. They keep the memory they free (`workers.keep_freed_memory`)."""
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    keep_freed_memory()
    value = derive_seed(seed, epoch, worker)
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)


class SideStream:
    """Where a loader makes its batches on a GPU: a CUDA stream of its own, created on first use and kept for
    the loader's life (the caching allocator reuses a freed block only on the stream that allocated it).

        side = SideStream(torch.device("cuda", 0))
        with side:
            batch = make_batch()  # kernels and copies queued on the side stream
        yield side.hand_over(batch)

    The device part reads from the device once per batch (which indices its maps hold). On the stream
    training runs on, that read would wait for the whole queued training step; on a stream of its own it
    waits for this batch's few kernels only, and with the higher priority those are scheduled ahead of the
    training kernels. `hand_over` makes the consumer's stream wait for the batch and marks its memory,
    allocated on the side stream, in use by the consumer's.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream: torch.cuda.Stream | None = None
        self._context = None

    def __enter__(self) -> "SideStream":
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device, priority=-1)
        self._context = torch.cuda.stream(self.stream)
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)

    def hand_over(self, batch: dict) -> dict:
        """The batch, made on the side stream, ready for the current stream of the device."""
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_stream(self.stream)
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                value.record_stream(consumer)
        return batch


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


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with every tensor on `device` (non_blocking: from pinned memory the copy overlaps; from
    pageable memory torch at least does not synchronise the stream after it); other values as they are."""
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


def select(sample: dict, keys: Sequence[str]) -> dict:
    """The entries of `sample` named in `keys`, in that order."""
    return {key: sample[key] for key in keys}


class EpochView(Dataset):
    """One epoch of a reader as a map-style dataset: index -> the sample drawn with the epoch's seed.

    Args:
        dataset: an LMDB reader (anything with `load(index, seed)`).
        seed: the epoch's augmentation seed (`augment_seed`).
        keys: the sample keys to keep.
    """

    def __init__(self, dataset, seed: int, keys: Sequence[str]):
        self.dataset = dataset
        self.seed = seed
        self.keys = tuple(keys)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return select(self.dataset.load(index, self.seed), self.keys)


class EpochLoader:
    """The epoch counter, resuming mid-epoch and the shard size, for every backend.

    Args:
        dataset: one of the LMDB readers; its `is_training` decides shuffling and augmentations.
        options: batch size, seed, rank and world size, keys (see `LoaderOptions`).
    """

    def __init__(self, dataset, options: LoaderOptions):
        self.dataset = dataset
        self.options = options
        self.batch_size = options.batch_size
        self.seed = options.seed
        self.shuffle = bool(dataset.is_training)
        self.drop_last = self.shuffle if options.drop_last is None else options.drop_last
        self.keys = batch_keys(dataset, options.keys)
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The epoch the next pass will be (passes count up from there); that pass starts after its first
        `skip_batches` batches, so a resumed run sees exactly the batches it had not seen yet."""
        self.epoch = epoch
        self.skip_batches = skip_batches

    def __len__(self) -> int:
        full, rest = divmod(math.ceil(len(self.dataset) / self.options.world_size), self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def _start_epoch(self) -> tuple[int, int, list[int]]:
        """Advances to the next epoch: its number, the batches skipped, and the sample order after them."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        skip, self.skip_batches = min(self.skip_batches, len(self)), 0
        options = self.options
        order = epoch_order(len(self.dataset), self.seed, epoch, self.shuffle, options.rank, options.world_size)
        return epoch, skip, order[skip * self.batch_size :]


def batch_keys(dataset, keys: Sequence[str] | None) -> tuple[str, ...]:
    """The keys a loader carries: `keys`, checked against what the reader produces, or all of those."""
    produced = tuple(dataset.keys)
    if keys is None:
        return produced
    missing = [key for key in keys if key not in produced]
    if missing:
        raise ValueError(
            f"{dataset.location}: the loader was asked for {', '.join(map(repr, missing))}, but this reader "
            f"produces only {', '.join(map(repr, produced))}"
        )
    return tuple(keys)

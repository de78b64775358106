"""The `torch-gpu` loader's two halves (`loader.DeviceLoader` runs them): workers only decode; crop, resize, flip,
normalise and masks run batched on the device.

    options = LoaderOptions(batch_size=32, workers=default_workers(), backend="torch-gpu", device_id=0)
    loader = make_loader(COCO("data/coco/train.lmdb", is_training=True), options)
    for batch in loader:
        batch["image"]  # (B, 3, 256, 256) float32 normalised, already on cuda:0

Per sample, a worker reads the record and draws its clip, crop window and flip with `LmdbDataset.planned`,
the step `LmdbDataset.load` (the `torch` loader) starts from too: for one (seed, epoch) both loaders augment
every sample alike. The order, the epoch seeds, resuming and the rank shards are `epochs.EpochLoader`'s, as
for every backend. The worker does no float work: it decodes each sample to uint8 and copies its crop
window of pixels and index map into a batch padded to the largest window, in shared memory (`fetch_raw`);
the batch is pinned (on CUDA) and copied to the device, where
`device_transforms.preprocess_batch` resizes, flips and normalises it in a fixed number of batched ops (it
takes any windows inside padded inputs; here they start at the top left), and the reader's own `finish`
turns each resized index map into masks (and boxes, classes) there, told which indices each map holds by
one read of the device per batch (`datasets.index_presence`). On CUDA the device part runs on a stream of
its own, so that this read, and the small copies of each sample's mask ids back to the device, wait for the
batch's kernels only, never for the training step queued on the consumer's stream (`loader.DeviceLoader`).
With `options.device_id=None` it runs on the CPU, in the main process.

Why the worker slices the window out: it has to copy every sample into the batch anyway, and copying only
the window costs nothing more while sending a third fewer bytes to the device. Index maps are not decoded
at all when no batch key needs them (`options.keys`, e.g. ("image",) in training).

Batches are the `torch` loader's (`loader` module docstring), with the same `options.keys`, on the device:
images within one uint8 level of it (see `device_transforms`), segments, boxes and classes identical.

Shape alphabet: B batch, T frames, H, W padded size, R output side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import Dataset, get_worker_info

from .datasets import Encoded, LmdbDataset, index_presence
from .device_transforms import preprocess_batch
from .epochs import select, to_device
from .transforms import CropWindow, pad_collate


class RawSamples(Dataset):
    """One epoch of an LMDB reader, fetched a batch at a time: indices -> their `RawBatch`, decoded with the
    epoch's seed (the DataLoader calls `__getitems__` with each batch's indices).

    Args:
        dataset: the reader.
        seed: the epoch's augmentation seed (`epochs.augment_seed`).
        with_segment: hand over the index maps (False: do not decode them, when no batch key needs them).
    """

    def __init__(self, dataset: LmdbDataset, seed: int, with_segment: bool = True):
        self.dataset = dataset
        self.seed = seed
        self.with_segment = with_segment and dataset.with_segment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: Sequence[int]) -> RawBatch:
        return fetch_raw(self.dataset, [self.dataset.planned(index, self.seed) for index in indices], self.with_segment)


@dataclass
class RawBatch:
    """Samples decoded, not transformed, each cut to its crop window and padded to the largest window among them.

    Attributes:
        pixels: (B, [T,] H, W, 3) uint8 RGB, channel last, padded at the bottom and right.
        segment: (B, [T,] H, W) uint8, padded alike, or None.
        windows: (B, 4) int64 the windows within `pixels`: top 0, left 0, height, width.
        flips: (B,) bool.
        encoded: B `Encoded` records (fields only: `finish` reads them).
    """

    pixels: torch.Tensor
    segment: torch.Tensor | None
    windows: torch.Tensor
    flips: torch.Tensor
    encoded: list[Encoded]

    def pin_memory(self) -> RawBatch:
        """The same batch with its pixels and index maps in pinned memory (the DataLoader calls this)."""
        segment = self.segment.pin_memory() if self.segment is not None else None
        return dataclasses.replace(self, pixels=self.pixels.pin_memory(), segment=segment)


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; in a worker, in shared memory, so that handing it to the main process
    copies nothing (as `default_collate` does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(torch.Size(shape).numel()))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def fetch_raw(dataset: LmdbDataset, plans: Sequence[tuple[Encoded, CropWindow, bool]], with_segment: bool) -> RawBatch:
    """The workers' half of the `torch-gpu` loader: the planned samples (`LmdbDataset.planned`) decoded, one
    at a time, each copied into the batch as soon as it is decoded, crop window only.

    Decoding a sample right before its copy keeps one sample's frames alive at a time, so their memory is
    reused from sample to sample instead of being mapped afresh (page faults cost a worker as much as the
    copy). COCO training windows keep 75-100 % of the largest square, about two thirds of a 4:3 image.
    Pixels are stored channel last, the layout the decoders produce (`LmdbDataset.decode` returns a
    channel-first view of it), so the copy runs along contiguous rows. The padding is left as allocated:
    nothing reads it.
    """
    lengths = sorted({len(encoded.images) for encoded, _, _ in plans})
    if len(lengths) > 1:
        raise ValueError(f"cannot batch clips of {lengths} frames: clips of different lengths need batch_size=1")
    windows = [window for _, window, _ in plans]
    frames = lengths if dataset.is_video else []
    size = (max(window.height for window in windows), max(window.width for window in windows))
    pixels = _batch_buffer((len(plans), *frames, *size, 3))
    segment = _batch_buffer((len(plans), *frames, *size)) if with_segment else None
    for b, (encoded, window, _) in enumerate(plans):
        rows = slice(window.top, window.top + window.height)
        columns = slice(window.left, window.left + window.width)
        decoded, index_map = dataset.decode(encoded if with_segment else dataclasses.replace(encoded, segments=None))
        pixels[b, ..., : window.height, : window.width, :] = decoded[..., rows, columns].movedim(-3, -1)
        if segment is not None:
            segment[b, ..., : window.height, : window.width] = index_map[..., rows, columns]
    return RawBatch(
        pixels=pixels,
        segment=segment,
        windows=torch.tensor([[0, 0, window.height, window.width] for window in windows], dtype=torch.int64),
        flips=torch.tensor([flip for _, _, flip in plans], dtype=torch.bool),
        # not the encoded bytes: they would travel back to the main process for nothing
        encoded=[dataclasses.replace(encoded, images=[], segments=None) for encoded, _, _ in plans],
    )


def fetched(batch: RawBatch) -> RawBatch:
    """The DataLoader's collate: `RawSamples.__getitems__` already made the batch."""
    return batch


def transform_raw(dataset: LmdbDataset, raw: RawBatch, device: torch.device, keys: Sequence[str]) -> dict:
    """The device half of the `torch-gpu` loader: a raw batch copied to `device`, cropped, resized, flipped
    and normalised there, then the reader's masks (`finish`) and the collate, with `keys` only.

    Shapes: `loader` module docstring (the batch dict), on `device`.
    """
    pixels = raw.pixels.to(device, non_blocking=True).movedim(-1, -3)  # (B, [T,] 3, H, W)
    segment = raw.segment.to(device, non_blocking=True) if raw.segment is not None else None
    # windows and flips stay on the host: the resampling taps are computed there (no device sync)
    images, segments = preprocess_batch(pixels, segment, raw.windows, raw.flips, dataset.resolution)
    if segments is None:
        samples = [select(dataset.finish(encoded, images[b], None), keys) for b, encoded in enumerate(raw.encoded)]
    else:
        # which indices each map holds, read from the device once for the batch: `finish` reads no map's values
        present = index_presence(segments).cpu()
        samples = [select(dataset.finish(encoded, images[b], segments[b], present[b]), keys)
                   for b, encoded in enumerate(raw.encoded)]
    batch = pad_collate(samples, dataset.pad_rules)
    return to_device(batch, device)  # classes are picked from the stored fields on the host

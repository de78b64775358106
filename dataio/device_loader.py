"""The `torch-gpu` loader's two halves (`loader.DeviceLoader` runs them): workers only decode; crop, resize, flip,
normalise and masks run batched on the device.

    options = LoaderOptions(batch_size=32, workers=default_workers(), backend="torch-gpu", device_id=0)
    loader = make_loader(COCO("data/coco/train.lmdb", is_training=True), options)
    for batch in loader:
        batch["image"]  # (B, 3, 256, 256) float32 normalised, already on cuda:0

Per sample, a worker reads the record, decodes it to uint8 and draws its clip, crop window and flip with
`LmdbDataset.decoded`, the step `LmdbDataset.load` (the `torch` loader) starts from too: for one (seed,
epoch) both loaders augment every sample alike. The order, the epoch seeds, resuming and the rank shards
are `epochs.EpochLoader`'s, as for every backend. The worker does no float work: it copies each sample's
crop window of uint8 pixels and index map into a batch padded to the largest window, in shared memory
(`collate_raw`); the batch is pinned (on CUDA) and copied to the device, where
`device_transforms.preprocess_batch` resizes, flips and normalises it in a fixed number of batched ops (it
takes any windows inside padded inputs; here they start at the top left), and the reader's own `finish`
turns each resized index map into masks (and boxes, classes) there. On CUDA the device part runs on a
stream of its own, so that the few host reads of `finish` wait for the batch's kernels only, never for the
training step queued on the consumer's stream (`loader.DeviceLoader`). With `options.device_id=None` it runs
on the CPU, in the main process.

Why the worker slices the window out: it has to copy every sample into the batch anyway, and copying only
the window costs nothing more while sending a third fewer bytes to the device. Index maps are not copied
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

from .datasets import Encoded, LmdbDataset
from .device_transforms import preprocess_batch
from .epochs import select
from .transforms import CropWindow, pad_collate


@dataclass
class RawSample:
    """One sample as a `torch-gpu` worker hands it over: decoded, not transformed.

    Attributes:
        encoded: the record's key, location and fields (`finish` reads them), without the encoded bytes.
        pixels: (3, H, W) or (T, 3, H, W) uint8 RGB.
        segment: (H, W) or (T, H, W) uint8 index map(s), or None.
        window: the crop window drawn for the sample (the whole clip shares it).
        flip: the flip drawn for it.
    """

    encoded: Encoded
    pixels: torch.Tensor
    segment: torch.Tensor | None
    window: CropWindow
    flip: bool


class RawSamples(Dataset):
    """One epoch of an LMDB reader as `RawSample`s: index -> the sample decoded with the epoch's seed.

    Args:
        dataset: the reader.
        seed: the epoch's augmentation seed (`epochs.augment_seed`).
        with_segment: hand over the index maps (False: drop them, when no batch key needs them).
    """

    def __init__(self, dataset: LmdbDataset, seed: int, with_segment: bool = True):
        self.dataset = dataset
        self.seed = seed
        self.with_segment = with_segment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> RawSample:
        encoded, pixels, segment, window, flip = self.dataset.decoded(index, self.seed)
        encoded = dataclasses.replace(encoded, images=[], segments=None)  # not sent back to the main process
        return RawSample(encoded, pixels, segment if self.with_segment else None, window, flip)


@dataclass
class RawBatch:
    """A batch of `RawSample`s cut to their crop windows, padded to the largest window among them.

    Attributes:
        pixels: (B, [T,] H, W, 3) uint8 RGB, channel last, padded at the bottom and right.
        segment: (B, [T,] H, W) uint8, padded alike, or None.
        windows: (B, 4) int64 the windows within `pixels`: top 0, left 0, height, width.
        flips: (B,) bool.
        encoded: B `Encoded` records (fields only).
    """

    pixels: torch.Tensor
    segment: torch.Tensor | None
    windows: torch.Tensor
    flips: torch.Tensor
    encoded: list[Encoded]

    def pin_memory(self) -> "RawBatch":
        """The same batch with its pixels and index maps in pinned memory (the DataLoader calls this)."""
        segment = self.segment.pin_memory() if self.segment is not None else None
        return dataclasses.replace(self, pixels=self.pixels.pin_memory(), segment=segment)


def _padded(tensors: list[torch.Tensor], height: int, width: int, spatial: int) -> torch.Tensor:
    """Stacks tensors of equal shape but for their height and width (the two axes from `spatial` on),
    padded at the bottom and right to height x width. The padding is left as allocated: nothing reads it.

    In a worker the batch is allocated in shared memory, so handing it to the main process copies nothing
    (as `default_collate` does).
    """
    first = tensors[0]
    shapes = {tuple(t.shape[:spatial]) + tuple(t.shape[spatial + 2 :]) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"cannot batch clips of shapes {sorted(shapes)}: clips of different lengths need batch_size=1")
    shape = (len(tensors), *first.shape[:spatial], height, width, *first.shape[spatial + 2 :])
    numel = int(torch.Size(shape).numel())
    if get_worker_info() is not None:
        out = first.new(first._typed_storage()._new_shared(numel, device=first.device)).resize_(shape)
    else:
        out = first.new_empty(shape)
    for slot, tensor in zip(out, tensors):
        slot.narrow(spatial, 0, tensor.shape[spatial]).narrow(spatial + 1, 0, tensor.shape[spatial + 1]).copy_(tensor)
    return out


def collate_raw(samples: Sequence[RawSample]) -> RawBatch:
    """The workers' collate of the `torch-gpu` loader: slices out the crop windows, pads and stacks, in uint8.

    COCO training windows keep 75-100 % of the largest square, about two thirds of a 4:3 image. Pixels are
    stacked channel last, the layout Pillow decodes to (`LmdbDataset.decode` returns a channel-first view
    of it), so the copy runs along contiguous rows.
    """
    crops = [sample.window for sample in samples]
    height = max(window.height for window in crops)
    width = max(window.width for window in crops)

    def cropped(tensor: torch.Tensor, window: CropWindow) -> torch.Tensor:
        return tensor[..., window.top : window.top + window.height, window.left : window.left + window.width]

    pixels = [cropped(sample.pixels, sample.window).movedim(-3, -1) for sample in samples]  # ([T,] h, w, 3)
    spatial = pixels[0].dim() - 3
    segments = [sample.segment for sample in samples]
    if segments[0] is not None:
        segments = [cropped(segment, sample.window) for segment, sample in zip(segments, samples)]
    windows = torch.tensor([[0, 0, window.height, window.width] for window in crops], dtype=torch.int64)
    return RawBatch(
        pixels=_padded(pixels, height, width, spatial),
        segment=_padded(segments, height, width, spatial) if segments[0] is not None else None,
        windows=windows.reshape(-1, 4),
        flips=torch.tensor([sample.flip for sample in samples], dtype=torch.bool),
        encoded=[sample.encoded for sample in samples],
    )


def transform_raw(dataset: LmdbDataset, raw: RawBatch, device: torch.device, keys: Sequence[str]) -> dict:
    """The device half of the `torch-gpu` loader: a raw batch copied to `device`, cropped, resized, flipped
    and normalised there, then the reader's masks (`finish`) and the collate, with `keys` only.

    Shapes: `loader` module docstring (the batch dict), on `device`.
    """
    pixels = raw.pixels.to(device, non_blocking=True).movedim(-1, -3)  # (B, [T,] 3, H, W)
    segment = raw.segment.to(device, non_blocking=True) if raw.segment is not None else None
    # windows and flips stay on the host: the resampling taps are computed there (no device sync)
    images, segments = preprocess_batch(pixels, segment, raw.windows, raw.flips, dataset.resolution)
    samples = [
        select(dataset.finish(encoded, images[b], segments[b] if segments is not None else None), keys)
        for b, encoded in enumerate(raw.encoded)
    ]
    return pad_collate(samples, dataset.pad_rules)

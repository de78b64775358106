"""DALI backend: decoding, crop, resize, flip and normalisation in a DALI pipeline (optional).

The host reads the same LMDB records as the torch readers and draws the same per-sample crop window,
flip and clip (`LmdbDataset.planned`), so for one (seed, epoch) both loaders augment every sample alike.
The pipeline works on frames: an image is one frame, a clip contributes T frames that all carry the
clip's window and flip. The mask post-processing (`LmdbDataset.finish`) and `pad_collate` then run on
the host (CPU mode) or on the pipeline's GPU.

    frames (encoded) --decoders.image ("mixed" on GPU, "cpu" without)--> (h, w, 3) uint8
        --slice(window)--> --resize(R, R, linear, antialias)--> uint8
        --crop_mirror_normalize(flip, mean, std)--> (3, R, R) float32
    index maps (PNG) --decoders.image(GRAY)--> --slice--> --resize(R, R, nearest)--> --flip--> (R, R) uint8

Differences to the torch path (measured in tests/dataio/test_dali.py, with DALI on the CPU): segments,
boxes and classes are identical; images differ by at most one uint8 level away from the border, and by up
to ~9 levels on the outermost rows/columns when downscaling, where DALI's antialiasing filter treats the
border differently. On a GPU, nvJPEG decodes the JPEGs instead of libjpeg-turbo: its pixels may differ more
(not measured yet).
"""

from __future__ import annotations

import re
from collections import deque
from contextlib import nullcontext
from typing import Iterator

import numpy as np
import torch

try:
    from nvidia.dali import fn, pipeline_def, types
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the DALI backend needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or pip install 'smoothsa[dali]'); "
        "use backend='torch' otherwise"
    ) from error

from .datasets import Encoded, LmdbDataset, index_presence
from .epochs import EpochLoader, LoaderOptions, SideStream, augment_seed, select, single_threaded, to_device
from .records import RecordError, check_png, encode_png
from .transforms import IMAGENET_MEAN, IMAGENET_STD, derive_seed, pad_collate


def _frame_pipeline(
    source,
    max_items: int,
    num_threads: int,
    device_id: int | None,
    resolution: int,
    with_segment: bool,
    channels_reversed: bool,
    seed: int,
):
    """Builds the per-frame pipeline; `source()` returns one chunk of (images, [segments,] anchors, shapes, flips).

    Args:
        source: batch callable of the external source.
        max_items: most frames per chunk.
        num_threads: CPU threads.
        device_id: CUDA device, or None for a CPU-only pipeline.
        resolution: output side R.
        with_segment: the chunks carry encoded index maps.
        channels_reversed: frames hold BGR-ordered RGB (cv2-written MOVi PNGs): decode as BGR to undo it.
        seed: DALI's own seed (nothing here draws from it; set for reproducibility).
    """

    @pipeline_def(batch_size=max_items, num_threads=num_threads, device_id=device_id, seed=seed, prefetch_queue_depth=2)
    def pipeline():
        inputs = fn.external_source(source=source, num_outputs=5 if with_segment else 4, batch=True)
        encoded, anchor, shape, flip = inputs[0], inputs[-3], inputs[-2], inputs[-1]
        decoder = "cpu" if device_id is None else "mixed"
        # no EXIF rotation: the official reader (and the torch path) decode the stored pixel grid as it is,
        # and the crop window was drawn from the unrotated header
        images = fn.decoders.image(
            encoded,
            device=decoder,
            output_type=types.BGR if channels_reversed else types.RGB,
            adjust_orientation=False,
        )
        images = fn.slice(images, anchor, shape, axes=[0, 1])  # integer anchor/shape: absolute (y, x) pixels
        images = fn.resize(images, size=[resolution, resolution], interp_type=types.INTERP_LINEAR, antialias=True)
        # resize keeps uint8 (rounded), as the torch path rounds before normalising
        images = fn.crop_mirror_normalize(
            images,
            mirror=flip,
            mean=list(IMAGENET_MEAN),
            std=list(IMAGENET_STD),
            output_layout="CHW",
            dtype=types.FLOAT,
        )
        if not with_segment:
            return (images,)
        # index maps are tiny 8-bit PNGs: decode them on the CPU, exactly (GRAY of a gray PNG is the identity)
        segments = fn.decoders.image(inputs[1], device="cpu", output_type=types.GRAY, adjust_orientation=False)
        segments = fn.slice(segments, anchor, shape, axes=[0, 1])
        segments = fn.resize(segments, size=[resolution, resolution], interp_type=types.INTERP_NN, antialias=False)
        segments = fn.flip(segments, horizontal=flip)
        if device_id is not None:
            segments = segments.gpu()
        return images, segments

    return pipeline()


def _to_torch(tensor_list, device_id: int | None) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) as a torch tensor on the same device."""
    if device_id is None:
        return torch.from_numpy(tensor_list.as_array())
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=f"cuda:{device_id}")
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out


class DaliLoader(EpochLoader):
    """Iterating yields one epoch of padded batches decoded and augmented by DALI.

    Args: as `epochs.EpochLoader` (same seed, same order, same augmentations as the torch loader);
        `options.workers` DALI CPU threads (at least 1), `options.device_id` the CUDA device ("mixed"
        decoding, GPU resize), or None for CPU-only DALI.
    The dataset's `is_training`, `resolution` and `finish` are used.
    """

    def __init__(self, dataset: LmdbDataset, options: LoaderOptions):
        super().__init__(dataset, options)
        self.num_threads = max(options.workers, 1)
        self.device_id = options.device_id
        self.side = SideStream(torch.device("cuda", self.device_id)) if self.device_id is not None else None
        clip = getattr(dataset, "clip_length", None) if dataset.is_training else None
        # a chunk is what one pipeline run processes; longer videos simply span several chunks
        self.max_items = self.batch_size * (clip or (24 if dataset.is_video else 1))

    def _plan(self, order: list[int], seed: int) -> Iterator[tuple[list[Encoded], list[tuple]]]:
        """Per batch: the encoded samples and, per frame, (image, segment, anchor, shape, flip)."""
        dataset = self.dataset
        for number in range(len(self) - self._skipped):
            samples, frames = [], []
            for index in order[number * self.batch_size : (number + 1) * self.batch_size]:
                encoded, window, flip = dataset.planned(index, seed)
                anchor = np.array([window.top, window.left], np.int64)
                shape = np.array([window.height, window.width], np.int64)
                flag = np.array(int(flip), np.int32)
                segments = encoded.segments or [None] * len(encoded.images)
                for segment in encoded.segments or ():  # decoded strictly, as the torch path does
                    check_png(_buffer(segment), dataset.records.where(encoded.key, "segment"))
                for image, segment in zip(encoded.images, segments):
                    frames.append((_buffer(image), _buffer(segment), anchor, shape, flag, encoded))
                samples.append(encoded)
            yield samples, frames

    def __iter__(self) -> Iterator[dict]:
        epoch, self._skipped, order = self._start_epoch()
        plan = self._plan(order, augment_seed(self.seed, epoch))
        with_segment = self.dataset.with_segment
        pending: deque = deque()  # per chunk handed to DALI, in order: (samples, last chunk of the batch)

        def columns(frames: list[tuple]) -> tuple[list, ...]:
            cols = [list(c) for c in zip(*frames)][:5]  # drop the owning sample
            return tuple(cols if with_segment else cols[:1] + cols[2:])

        def chunks() -> Iterator[tuple]:
            for samples, frames in plan:
                starts = range(0, len(frames), self.max_items)
                for first in starts:
                    part = frames[first : first + self.max_items]
                    pending.append((samples, first == starts[-1], [frame[-1] for frame in part]))
                    yield columns(part)
            while True:  # DALI prefetches past the end of the epoch: feed it a tiny placeholder frame
                pending.append((None, True, []))
                yield columns([_PLACEHOLDER])

        stream = chunks()
        pipe = _frame_pipeline(
            lambda: next(stream),
            self.max_items,
            self.num_threads,
            self.device_id,
            self.dataset.resolution,
            with_segment,
            getattr(self.dataset, "channels_reversed", False),
            derive_seed(self.seed, epoch, 1 << 20),
        )
        pipe.build()
        images, segments = [], []
        while True:
            # host work: reading records, masks, collate (see loader.single_threaded); on a GPU, the copies out
            # of DALI and the masks run on the loader's own stream (`epochs.SideStream`)
            with single_threaded(), self.side or nullcontext():
                try:
                    outputs = pipe.run()
                except RuntimeError as error:  # e.g. a frame DALI cannot decode: name its record
                    raise RecordError(f"{_culprit(str(error), pending[0][2])}: DALI failed: {error}") from error
                samples, last, _ = pending.popleft()
                if samples is None:  # chunks are FIFO: the first placeholder ends the epoch
                    break
                images.append(_to_torch(outputs[0], self.device_id))
                if with_segment:
                    segments.append(_to_torch(outputs[1], self.device_id)[..., 0])  # (N, R, R)
                batch = None
                if last:
                    batch = self._batch(samples, torch.cat(images), torch.cat(segments) if with_segment else None)
                    images, segments = [], []
            if batch is not None:
                yield self.side.hand_over(batch) if self.side else batch

    def _batch(self, samples: list[Encoded], images: torch.Tensor, segments: torch.Tensor | None) -> dict:
        """Splits the frames back into samples, runs the dataset's post-processing, and collates. Which indices
        each frame's map holds is read from the device once for the batch (`index_presence`)."""
        out, first = [], 0
        present = index_presence(segments).cpu() if segments is not None else None  # (frames, 256)
        for encoded in samples:
            count = len(encoded.images)
            pixels = images[first : first + count]
            segment = segments[first : first + count] if segments is not None else None
            held = present[first : first + count].any(0) if present is not None else None
            if not self.dataset.is_video:
                pixels = pixels[0]
                segment = segment[0] if segment is not None else None
            out.append(select(self.dataset.finish(encoded, pixels, segment, held), self.keys))
            first += count
        batch = pad_collate(out, self.dataset.pad_rules)
        return to_device(batch, images.device)  # classes are picked from the stored fields on the host


def _culprit(message: str, owners: list[Encoded]) -> str:
    """The record of the frame DALI's error message points at ("sample #k"), else all of the chunk's."""
    match = re.search(r"sample #(\d+)", message)
    if match and int(match.group(1)) < len(owners):
        field = "segment" if "segments = fn.decoders.image" in message else "image"  # the failing line
        return f"{owners[int(match.group(1))].location} field {field!r}"
    return "one of " + ", ".join(dict.fromkeys(owner.location for owner in owners))


def _buffer(encoded) -> np.ndarray:
    """Encoded bytes as the 1-D uint8 array DALI's decoder takes (an empty one for a missing map)."""
    if encoded is None:
        return np.zeros(0, np.uint8)
    if isinstance(encoded, np.ndarray):
        return encoded.reshape(-1).view(np.uint8)
    return np.frombuffer(encoded, np.uint8)


_BLANK = encode_png(np.zeros((8, 8), np.uint8))
_PLACEHOLDER = (_BLANK, _BLANK, np.zeros(2, np.int64), np.full(2, 8, np.int64), np.array(0, np.int32), None)

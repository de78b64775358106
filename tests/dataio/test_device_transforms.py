"""The batched device transforms and the `torch-gpu` loader against the per-sample `torch` path, on CPU tensors.

Images must be within one uint8 level of `transforms.preprocess` (and equal almost everywhere), index maps,
masks, boxes and classes identical, for the same windows and flips; inputs of mixed, odd, portrait and
smaller-than-the-output sizes share a batch, and the padding between them is poisoned.
"""

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree
from torch.utils._python_dispatch import TorchDispatchMode

from smoothsa.dataio import DeviceLoader, LoaderOptions, make_loader
from smoothsa.dataio.datasets import COCO, MOVi, VOC, YTVIS, ClevrTex
from smoothsa.dataio.device_loader import RawSamples, fetch_raw, transform_raw
from smoothsa.dataio.device_transforms import antialias_taps, nearest_exact_index, preprocess_batch
from smoothsa.dataio.records import encode_jpeg, encode_png, write_records
from smoothsa.dataio.synthetic import write_synthetic
from smoothsa.dataio.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop_window,
    preprocess,
    random_crop_window,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
# (height, width): odd, portrait, landscape, smaller than the output, one pixel wide, exactly the output
SIZES = [(240, 320), (321, 199), (97, 131), (480, 640), (256, 256), (37, 1), (1, 300), (511, 257)]


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of normalised images, in uint8 levels. Shapes: (..., 3, R, R)."""
    return ((a - b).abs() * STD).round()


def padded(tensors: list[torch.Tensor], poison: int) -> torch.Tensor:
    """Stacks tensors padded to the largest height and width with `poison` (padding must never be read)."""
    height = max(t.shape[-2] for t in tensors)
    width = max(t.shape[-1] for t in tensors)
    out = torch.full((len(tensors), *tensors[0].shape[:-2], height, width), poison, dtype=torch.uint8)
    for slot, tensor in zip(out, tensors):
        slot[..., : tensor.shape[-2], : tensor.shape[-1]] = tensor
    return out


@pytest.mark.parametrize("is_training", [True, False])
@pytest.mark.parametrize("frames", [None, 3])
def test_batch_matches_per_sample_preprocess(is_training, frames):
    generator = torch.Generator().manual_seed(1)
    lead = () if frames is None else (frames,)
    images, segments, windows, flips, expected = [], [], [], [], []
    for number, (height, width) in enumerate(SIZES):
        image = torch.randint(0, 256, (*lead, 3, height, width), dtype=torch.uint8, generator=generator)
        segment = torch.randint(0, 9, (*lead, height, width), dtype=torch.uint8, generator=generator)
        if is_training:
            window, flip = random_crop_window(height, width, generator=generator), number % 3 != 0
        else:
            window, flip = center_crop_window(height, width), False
        out = preprocess(image, segment, is_training, 64, window, flip)
        images.append(image)
        segments.append(segment)
        windows.append([window.top, window.left, window.height, window.width])
        flips.append(flip)
        expected.append(out)
    got_images, got_segments = preprocess_batch(
        padded(images, 255), padded(segments, 7), torch.tensor(windows), torch.tensor(flips), resolution=64
    )
    assert got_images.shape == (len(SIZES), *lead, 3, 64, 64) and got_images.dtype == torch.float32
    assert got_segments.shape == (len(SIZES), *lead, 64, 64) and got_segments.dtype == torch.uint8
    differ = 0
    for number, (image, segment) in enumerate(expected):
        assert torch.equal(got_segments[number], segment), SIZES[number]
        diff = levels(got_images[number], image)
        assert diff.max() <= 1, SIZES[number]
        differ += int(diff.gt(0).sum())
    assert differ <= 1e-3 * got_images.numel()  # one level only where float32 sums straddle a half level


def test_nearest_exact_index_is_interpolate():
    """Every crop length 1..700 to 256 and 64 (and an upscaling one), against F.interpolate of a ramp."""
    lengths = torch.arange(1, 701)
    for resolution in (256, 64, 1000):
        index = nearest_exact_index(torch.zeros_like(lengths), lengths, resolution, torch.zeros(700, dtype=torch.bool))
        for length in (1, 2, 3, 255, 256, 257, 333, 479, 480, 640, 700):
            ramp = torch.arange(length, dtype=torch.float32).view(1, 1, 1, length)
            expected = F.interpolate(ramp, size=(1, resolution), mode="nearest-exact").flatten().long()
            assert torch.equal(index[length - 1], expected), (length, resolution)


def test_antialias_taps_against_float64():
    """Weights sum to one, flips reverse them, and resampling with them is F.interpolate in float64."""
    start = torch.tensor([0, 5, 17, 3])
    length = torch.tensor([480, 199, 97, 256])
    flip = torch.tensor([False, True, False, True])
    index, weight = antialias_taps(start, length, 256, flip, size=700)
    assert torch.allclose(weight.sum(-1), torch.ones(4, 256))
    assert (weight >= 0).all() and index.max() < 700
    signal = torch.rand(700, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for b in range(4):
        crop = signal[start[b] : start[b] + length[b]].view(1, 1, 1, -1)
        expected = F.interpolate(crop, size=(1, 256), mode="bilinear", align_corners=False, antialias=True).flatten()
        if flip[b]:
            expected = expected.flip(0)
        got = (signal[index[b]] * weight[b].double()).sum(-1)
        assert torch.allclose(got, expected, atol=1e-6), b


# ------------------------------------------------------------------------------------------------
# the loaders


def assert_levels_close(a: torch.Tensor, b: torch.Tensor):
    diff = levels(a, b.reshape(a.shape))
    # smooth synthetic frames hit exact half levels (weights like 1/4, 3/4) more often than noise does
    assert diff.max() <= 1 and diff.gt(0).float().mean() <= 1e-2


def mixed_image_records(image_format: str, with_fields: bool) -> list[dict]:
    """Records of the awkward SIZES with a few rectangles of indices 0..4 (0: background/unannotated)."""
    rng = np.random.default_rng(0)
    records = []
    for height, width in SIZES + SIZES[:3]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        segment = np.zeros((height, width), np.uint8)
        for value in range(1, 5):
            top, left = rng.integers(0, height), rng.integers(0, width)
            segment[top : top + max(height // 3, 1), left : left + max(width // 3, 1)] = value
        encoded = encode_png(image).tobytes() if image_format == "png" else encode_jpeg(image)
        record = dict(image=encoded, segment=encode_png(segment))
        if with_fields:
            record.update(clazz=np.arange(1, 5, dtype=np.uint8) * 7, isthing=np.array([True, False, True, True]))
        records.append(record)
    return records


READERS = {
    "clevrtex": lambda path, train: ClevrTex(path, train),
    "voc": lambda path, train: VOC(path, train),
    "coco": lambda path, train: COCO(path, train, mode="instance", with_bbox=True, with_clazz=True),
    "coco-panoptic": lambda path, train: COCO(path, train, mode="panoptic", with_bbox=True),
}


@pytest.mark.parametrize("is_training", [True, False])
@pytest.mark.parametrize("kind", list(READERS))
def test_image_loaders_agree(tmp_path, kind, is_training, same_batches):
    records = mixed_image_records("png" if kind == "clevrtex" else "jpeg", with_fields=kind.startswith("coco"))
    path = write_records(tmp_path / "split.lmdb", records)
    options = LoaderOptions(batch_size=4, seed=3, drop_last=False)
    torch_loader = make_loader(READERS[kind](path, is_training), options)
    device_loader = make_loader(READERS[kind](path, is_training), replace(options, backend="torch-gpu"))
    for _ in range(2):  # two epochs: new order, new windows and flips, still the same in both
        assert same_batches(torch_loader, device_loader, "image", assert_levels_close) == 3


def test_windows_and_flips_are_the_torch_paths(tmp_path):
    """A raw batch holds each sample's window of the decoded pixels and index map, at the top left, with the
    flip the per-sample path draws; both flips occur."""
    path = write_records(tmp_path / "train.lmdb", mixed_image_records("png", with_fields=False))
    dataset = ClevrTex(path, is_training=True)
    raw = RawSamples(dataset, seed=11)
    flips = set()
    for indices in ([0, 1, 2], list(range(3, len(dataset)))):
        batch = raw.__getitems__(indices)
        windows = [dataset.planned(index, 11)[1] for index in indices]
        height, width = max(w.height for w in windows), max(w.width for w in windows)
        assert batch.pixels.shape == (len(indices), height, width, 3)
        assert batch.segment.shape == (len(indices), height, width) and batch.segment.dtype == torch.uint8
        for b, (index, window) in enumerate(zip(indices, windows)):
            pixels, segment = dataset.decode(dataset.encoded(index, dataset.rngs(index, 11)[1]))
            rows, cols = slice(window.top, window.top + window.height), slice(window.left, window.left + window.width)
            assert batch.windows[b].tolist() == [0, 0, window.height, window.width]
            assert torch.equal(batch.pixels[b, : window.height, : window.width], pixels[:, rows, cols].permute(1, 2, 0))
            assert torch.equal(batch.segment[b, : window.height, : window.width], segment[rows, cols])
            flip = bool(batch.flips[b])
            expected = preprocess(pixels, None, False, 256, window, flip)[0]
            assert torch.equal(dataset.load(index, 11)["image"], expected)  # the same window and flip, drawn again
            assert batch.encoded[b].images == [] and batch.encoded[b].segments is None
            flips.add(flip)
    assert flips == {True, False}


def test_video_loaders_agree(tmp_path, same_batches):
    path = write_synthetic(tmp_path, "train", num=4, video=True, height=75, width=101, num_frames=8)
    movi = lambda: MOVi(path, True, 64, clip_length=3, with_bbox=True)  # noqa: E731
    torch_loader = make_loader(movi(), LoaderOptions(batch_size=2, seed=5))
    device_loader = make_loader(movi(), LoaderOptions(batch_size=2, seed=5, backend="torch-gpu"))
    assert same_batches(torch_loader, device_loader, "video", assert_levels_close) == 2
    path = write_synthetic(tmp_path, "val", num=2, video=True, height=48, width=40, num_frames=5, layout="ytvis")
    ytvis = lambda: YTVIS(path, False, 32, clip_length=None, with_clazz=True)  # noqa: E731
    torch_loader = make_loader(ytvis(), LoaderOptions())
    device_loader = make_loader(ytvis(), LoaderOptions(backend="torch-gpu"))
    assert same_batches(torch_loader, device_loader, "video", assert_levels_close) == 2


def test_workers_and_no_segments(tmp_path, same_batches):
    """Two worker processes, segments not decoded, last batch dropped: still the torch loader's batches."""
    path = write_synthetic(tmp_path, "train", num=7, height=64, width=80, video=True, num_frames=4)
    make = lambda backend: make_loader(  # noqa: E731
        MOVi(path, True, 32, clip_length=2, with_segment=False),
        LoaderOptions(batch_size=3, workers=2, seed=1, backend=backend),
    )
    assert same_batches(make("torch"), make("torch-gpu"), "video", assert_levels_close) == 2


def test_clips_of_different_lengths_need_batch_size_one(tmp_path):
    path = write_synthetic(tmp_path, "val", num=1, video=True, height=16, width=16, num_frames=4)
    other = write_synthetic(tmp_path / "b", "val", num=1, video=True, height=16, width=16, num_frames=5)
    plans = [MOVi(p, False, 16, clip_length=None).planned(0, 0) for p in (path, other)]
    with pytest.raises(ValueError, match=r"clips of \[4, 5\] frames.*batch_size=1"):
        fetch_raw(MOVi(path, False, 16, clip_length=None), plans, with_segment=True)


def test_keys_and_shards_follow_the_options(tmp_path, same_batches):
    """Training batches carry only `options.keys` (the index maps never leave the workers), and rank 1 of 2
    loads the torch loader's shard."""
    path = write_records(tmp_path / "train.lmdb", mixed_image_records("jpeg", with_fields=True))
    options = LoaderOptions(batch_size=2, seed=4, rank=1, world_size=2, keys=("image",))
    def device(**changes):
        return make_loader(READERS["coco"](path, True), replace(options, backend="torch-gpu", **changes))

    assert all(raw.segment is None for raw in device().raw_batches())
    assert same_batches(make_loader(READERS["coco"](path, True), options), device(), "image", assert_levels_close) == 3
    assert list(next(iter(device(keys=None)))) == ["image", "segment", "bbox", "clazz"]


def test_cuda_batches_are_pinned(tmp_path, monkeypatch):
    """On CUDA the DataLoader pins the uint8 batches (its pin step reaches RawBatch.pin_memory)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    path = write_records(tmp_path / "val.lmdb", mixed_image_records("png", with_fields=False)[:2])
    on_cuda = DeviceLoader(ClevrTex(path), LoaderOptions(batch_size=2, backend="torch-gpu", device_id=0))
    assert on_cuda.pin_memory and on_cuda.device == torch.device("cuda", 0)  # constructing touches no GPU
    assert not DeviceLoader(ClevrTex(path), LoaderOptions(batch_size=2, backend="torch-gpu")).pin_memory
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args: pinned.append(self) or self.clone())
    batch = RawSamples(ClevrTex(path), seed=0).__getitems__([0, 1])
    out = pin_memory(batch)
    assert type(out) is type(batch) and len(pinned) == 2
    assert {id(t) for t in pinned} == {id(batch.pixels), id(batch.segment)}
    assert torch.equal(out.pixels, batch.pixels) and out.pixels is not batch.pixels


# ops whose output shape, or whose result on the host, depends on a tensor's values: on a GPU each waits for it
DATA_DEPENDENT = {torch.ops.aten.nonzero.default, torch.ops.aten.bincount.default, torch.ops.aten._unique2.default,
                  torch.ops.aten.masked_select.default, torch.ops.aten._local_scalar_dense.default}


class ValueReads(TorchDispatchMode):
    """Records the data-dependent ops run on tensors larger than `limit` elements (index maps, masks)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.calls = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        sizes = [a.numel() for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        masked = func is torch.ops.aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if (func in DATA_DEPENDENT or masked) and max(sizes, default=0) > self.limit:
            self.calls.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["coco", "voc", "movi", "ytvis"])
def test_the_device_part_reads_the_maps_once_per_batch(tmp_path, kind):
    """`transform_raw` learns which indices each map holds from one (B, 256) presence read: no op whose result
    depends on the values of an index map or a mask runs per sample (each would wait for the GPU there). The
    `torch` path, per sample, does run them: the check can tell."""
    if kind in ("movi", "ytvis"):
        path = write_synthetic(tmp_path, "val", num=3, video=True, height=40, width=48, num_frames=3, layout=kind)
        reader = MOVi(path, False, 32, clip_length=None, with_bbox=True) if kind == "movi" else YTVIS(
            path, False, 32, clip_length=None, with_clazz=True)
    else:
        path = write_records(tmp_path / "val.lmdb", mixed_image_records("jpeg", with_fields=kind == "coco"))
        reader = READERS[kind](path, False)
    raw = RawSamples(reader, seed=0).__getitems__([0, 1, 2])
    limit = 256 * 3  # the presence rows of the batch; an index map is 32 x 32 or more
    with ValueReads(limit) as reads:
        batch = transform_raw(reader, raw, torch.device("cpu"), reader.keys)
    assert reads.calls == [] and "segment" in batch
    with ValueReads(limit) as reads:
        reader.load(0)
    assert reads.calls  # the per-sample path reads its map's values


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_made_beside_a_busy_stream_are_the_torch_loaders(tmp_path, same_batches):
    """On CUDA the device part runs on the loader's own stream: while the consumer's stream is busy, the
    batches it receives are still the `torch` loader's (masks and boxes made with host reads included)."""
    path = write_synthetic(tmp_path, "train", num=4, video=True, height=75, width=101, num_frames=8)
    movi = lambda: MOVi(path, True, 64, clip_length=3, with_bbox=True)  # noqa: E731
    torch_loader = make_loader(movi(), LoaderOptions(batch_size=2, seed=5))
    device_loader = make_loader(movi(), LoaderOptions(batch_size=2, seed=5, backend="torch-gpu", device_id=0))
    busy = torch.randn(4096, 4096, device="cuda")
    batches = []
    for batch in device_loader:
        for _ in range(20):
            busy = (busy @ busy).tanh_()  # queued on the consumer's stream before it reads the batch
        batches.append({key: value.cpu() for key, value in batch.items()})  # read on the consumer's stream
    assert same_batches(torch_loader, batches, "video", assert_levels_close) == 2
    # classes come from the records' fields on the host; in the batch they are on the device with the rest
    path = write_records(tmp_path / "coco.lmdb", mixed_image_records("jpeg", with_fields=True))
    options = LoaderOptions(batch_size=2, seed=5, backend="torch-gpu", device_id=0)
    batch = next(iter(make_loader(READERS["coco"](path, True), options)))
    assert {key: value.device.type for key, value in batch.items()} == dict.fromkeys(batch, "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_part_synchronises_once_per_batch(tmp_path):
    """On CUDA the device part makes each batch with one synchronising call, its presence read
    (`torch.cuda.set_sync_debug_mode` warns on every synchronising call)."""
    path = write_records(tmp_path / "val.lmdb", mixed_image_records("jpeg", with_fields=True))
    loader = make_loader(READERS["coco"](path, False), LoaderOptions(batch_size=2, backend="torch-gpu", device_id=0))
    next(iter(loader))  # first use: streams, kernels, the pinned-memory pool
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = list(loader)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert batches and len(syncs) == len(batches), syncs

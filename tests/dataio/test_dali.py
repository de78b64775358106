"""DALI loader vs torch loader: same windows and flips -> identical masks, images within a measured tolerance.

Tolerance (measured on 480x640 JPEGs downscaled to 256, DALI 2.4 CPU vs torch 2.13 CPU): segments,
boxes and classes are identical; normalised images, converted back to uint8 levels, differ by at most
1 level away from the image border (mean |diff| < 0.004 levels there; < 0.4 % of values differ by
more than half a level) and by up to ~9 levels on the outermost rows/columns, where DALI's
antialiasing filter treats the border differently. The asserts leave about 2x headroom.
"""

import importlib
import sys

import numpy as np
import pytest
import torch

from smoothsa.dataio.datasets import COCO, MOVi, ClevrTex
from smoothsa.dataio.loader import LoaderOptions, make_loader
from smoothsa.dataio.records import encode_jpeg, encode_png
from smoothsa.dataio.synthetic import write_synthetic
from smoothsa.dataio.transforms import IMAGENET_STD, CropWindow, preprocess

STD = torch.tensor(IMAGENET_STD)


def test_missing_dali_explains_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.delitem(sys.modules, "smoothsa.dataio.dali", raising=False)
    with pytest.raises(ImportError, match="pip install nvidia-dali-cuda120"):
        importlib.import_module("smoothsa.dataio.dali")


dali = pytest.importorskip("nvidia.dali", reason="DALI not installed (pip install nvidia-dali-cuda120)")


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of normalised images in uint8 levels. Shapes: (..., 3, H, W)."""
    return (a - b).abs() * STD.view(3, 1, 1)


def assert_images_close(a: torch.Tensor, b: torch.Tensor):
    diff = levels(a, b)
    interior = diff[..., 1:-1, 1:-1]
    assert interior.max() <= 1.0 + 1e-3 and interior.mean() <= 0.01
    assert diff.max() <= 16


@pytest.fixture(scope="module")
def jpeg_images(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("coco"), "train", num=12, height=480, width=640, image_format="jpeg")


@pytest.mark.parametrize("is_training", [True, False])
def test_images_match_torch(jpeg_images, is_training, same_batches):
    make = lambda: COCO(jpeg_images, is_training, mode="instance", with_bbox=True, with_clazz=True)  # noqa: E731
    a = make_loader(make(), LoaderOptions(batch_size=5, seed=7, drop_last=False))
    b = make_loader(make(), LoaderOptions(batch_size=5, workers=2, seed=7, backend="dali", drop_last=False))
    assert same_batches(a, b, "image", assert_images_close) == 3  # 12 samples: 5 + 5 + 2
    # the next epoch (new augmentations) still agrees
    if is_training:
        assert same_batches(a, b, "image", assert_images_close) == 3


def test_explicit_window_and_flip(jpeg_images):
    """One frame through the DALI pipeline with a given crop window and flip vs `preprocess`."""
    from smoothsa.dataio.dali import _frame_pipeline

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    image[40:200, 60:300] = [250, 30, 20]
    segment = np.zeros((300, 400), np.uint8)
    segment[40:200, 60:300] = 3
    segment[::7, ::5] = 1
    window = CropWindow(13, 21, 270, 341)
    encoded = np.frombuffer(encode_jpeg(image, quality=95), np.uint8)
    chunk = ([encoded], [encode_png(segment)], [np.array([13, 21])], [np.array([270, 341])], [np.array(1, np.int32)])
    pipe = _frame_pipeline(lambda: chunk, 1, 1, None, 256, True, False, 0)
    pipe.build()
    images, segments = pipe.run()
    from smoothsa.dataio.records import decode_rgb

    decoded = torch.from_numpy(decode_rgb(encoded, "t").copy()).permute(2, 0, 1)
    expected_image, expected_segment = preprocess(decoded, torch.from_numpy(segment), True, 256, window=window, flip=True)
    assert torch.equal(torch.from_numpy(segments.as_array()[0, ..., 0]), expected_segment)
    assert_images_close(torch.from_numpy(images.as_array()[0]), expected_image)


def test_video_matches_torch(tmp_path, same_batches):
    path = write_synthetic(tmp_path, "train", num=5, video=True, height=96, width=128, num_frames=7)
    for is_training in (True, False):
        make = lambda: MOVi(path, is_training, clip_length=3, with_bbox=True)  # noqa: E731
        a = make_loader(make(), LoaderOptions(batch_size=2, seed=2, drop_last=False))
        b = make_loader(make(), LoaderOptions(batch_size=2, seed=2, backend="dali", drop_last=False))
        assert same_batches(a, b, "video", assert_images_close) == 3


def test_long_videos_span_several_pipeline_runs(tmp_path, same_batches):
    """Validation videos longer than 24 frames per sample are processed in several chunks, then re-joined."""
    path = write_synthetic(tmp_path, "val", num=3, video=True, height=32, width=32, num_frames=30)
    a = make_loader(MOVi(path, with_bbox=True), LoaderOptions())
    b = make_loader(MOVi(path, with_bbox=True), LoaderOptions(backend="dali"))
    assert b.max_items == 24
    assert same_batches(a, b, "video", assert_images_close) == 3


def test_without_segments_and_drop_last(tmp_path, same_batches):
    path = write_synthetic(tmp_path, "val", num=5, height=64, width=64)
    a = make_loader(ClevrTex(path, with_segment=False), LoaderOptions(batch_size=2, drop_last=True))
    b = make_loader(ClevrTex(path, with_segment=False), LoaderOptions(batch_size=2, drop_last=True, backend="dali"))
    assert len(b) == 2
    batches = list(b)
    assert len(batches) == 2 and set(batches[0]) == {"image"}
    assert same_batches(a, b, "image", assert_images_close) == 2


def test_broken_image_names_the_records(tmp_path):
    from smoothsa.dataio.records import LmdbRecords, RecordError, write_records

    source = LmdbRecords(write_synthetic(tmp_path / "ok", "val", num=3, height=64, width=64, image_format="jpeg"))
    records = [source.get(i) for i in range(3)]
    records[1]["image"] = records[1]["image"][: len(records[1]["image"]) // 2]  # header intact, data cut
    path = write_records(tmp_path / "val.lmdb", records)
    with pytest.raises(RecordError, match="coco/val key 000001 field 'image': DALI failed"):
        list(make_loader(ClevrTex(path, name="coco"), LoaderOptions(batch_size=3, backend="dali")))


def exif_rotated_jpeg(image: np.ndarray, orientation: int = 6) -> bytes:
    """JPEG bytes whose EXIF orientation tag asks viewers to rotate (6: 90 degrees clockwise)."""
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def test_exif_orientation_is_not_applied(tmp_path, same_batches):
    """Both paths decode the stored pixel grid, as the official reader: the EXIF orientation is not applied."""
    from smoothsa.dataio.records import write_records

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    image[:, :160] //= 4  # a dark left half: a rotation would put it on top
    segment = np.zeros((240, 320), np.uint8)
    segment[:, :160] = 1
    record = dict(image=exif_rotated_jpeg(image), segment=encode_png(segment))
    path = write_records(tmp_path / "train.lmdb", [record] * 4)
    for is_training in (True, False):
        options = dict(batch_size=2, seed=5, drop_last=False)
        a = make_loader(ClevrTex(path, is_training), LoaderOptions(**options))
        b = make_loader(ClevrTex(path, is_training), LoaderOptions(**options, backend="dali"))
        assert same_batches(a, b, "image", assert_images_close) == 2
    sample = ClevrTex(path)[0]  # validation: the centred 240x240 square, columns 40..279
    assert sample["segment"].shape == (256, 256, 2) and sample["segment"][:, :128, 1].all()


def test_corrupt_segment_is_named_on_the_dali_path(tmp_path):
    from smoothsa.dataio.records import RecordError, write_records

    segment = np.zeros((32, 32), np.uint8)
    segment[4:20, 6:30] = 1
    png = bytearray(encode_png(segment).tobytes())
    png[len(png) // 2] ^= 0x01
    good = dict(image=encode_jpeg(np.full((32, 32, 3), 70, np.uint8)), segment=encode_png(segment))
    path = write_records(tmp_path / "val.lmdb", [good, dict(good, segment=bytes(png))])
    with pytest.raises(RecordError, match=r"clevrtex/val key 000001 field 'segment': cannot decode the image"):
        list(make_loader(ClevrTex(path), LoaderOptions(batch_size=1, backend="dali")))

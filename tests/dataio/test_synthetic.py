"""Synthetic scenes: exact masks, learnable statistics, official layouts readable by the readers."""

import numpy as np
import pytest
import torch

from smoothsa.dataio.datasets import COCO, MOVi, YTVIS, ClevrTex
from smoothsa.dataio.records import LmdbRecords, decode_index, decode_rgb
from smoothsa.dataio.synthetic import PALETTE, main, render_scene, render_video, write_synthetic


@pytest.mark.parametrize("seed", range(8))
def test_scene_masks_are_exact(seed):
    scene = render_scene(np.random.default_rng(seed), 96, 128)
    image, segment, clazz = scene["image"], scene["segment"], scene["clazz"]
    assert image.shape == (96, 128, 3) and image.dtype == np.uint8
    assert segment.shape == (96, 128) and segment.dtype == np.uint8
    count = len(clazz)
    assert 2 <= count <= 6 and set(clazz.tolist()) <= {1, 2, 3}
    assert segment.max() <= count
    colours = []
    for k in range(1, count + 1):
        pixels = image[segment == k]
        assert len(pixels) > 0  # every object is visible
        assert (pixels == pixels[0]).all()  # flat colour exactly under its mask
        assert any((pixels[0] == colour).all() for colour in PALETTE)
        colours.append(tuple(pixels[0]))
    assert len(set(colours)) == count  # distinct colours
    background = image[segment == 0]
    assert not any((background == np.array(c)).all(-1).any() for c in colours)  # no object colour outside its mask


def test_scene_statistics_are_learnable():
    """Sizes 1/8-1/3 of the side (visible areas after occlusion), 2-6 objects, all counts drawn."""
    counts, fractions = [], []
    for seed in range(60):
        scene = render_scene(np.random.default_rng(seed), 128, 128)
        counts.append(len(scene["clazz"]))
        fractions += [np.count_nonzero(scene["segment"] == k) / 128**2 for k in range(1, counts[-1] + 1)]
    assert set(counts) == {2, 3, 4, 5, 6}
    # a triangle of side 1/8 covers ~0.7 % of the image, an unoccluded square of side 1/3 ~11 %
    assert 0.003 < min(fractions) and max(fractions) < 0.12
    assert 0.01 < np.median(fractions) < 0.06


def test_video_moves_objects_and_boxes_match_masks():
    clip = render_video(np.random.default_rng(3), 64, 80, num_frames=5)
    video, segment, bbox = clip["video"], clip["segment"], clip["bbox"]
    count = bbox.shape[1]
    assert video.shape == (5, 64, 80, 3) and segment.shape == (5, 64, 80) and bbox.shape == (5, count, 4)
    assert clip["clazz"].shape == (5, count)
    assert not np.array_equal(segment[0], segment[-1])  # objects move
    for t in range(5):
        for k in range(count):
            rows, cols = np.nonzero(segment[t] == k + 1)
            if len(rows) == 0:
                assert (bbox[t, k] == 0).all()
                continue
            assert bbox[t, k].tolist() == pytest.approx([cols.min() / 80, rows.min() / 64, cols.max() / 80, rows.max() / 64])


def test_images_readable_as_clevrtex_and_coco(tmp_path):
    path = write_synthetic(tmp_path, "val", num=6, height=64, width=80, seed=1)
    assert path == tmp_path / "val.lmdb"
    raw = LmdbRecords(path).get(2)
    assert isinstance(raw["image"], bytes) and raw["segment"].dtype == np.uint8 and raw["segment"].ndim == 1
    scene = render_scene(np.random.default_rng([1, __import__("zlib").crc32(b"val"), 2]), 64, 80)
    assert np.array_equal(decode_rgb(raw["image"], "t"), scene["image"])  # PNG: lossless, reproducible
    assert np.array_equal(decode_index(raw["segment"], "t"), scene["segment"])
    clevrtex = ClevrTex(path)
    out = clevrtex[2]
    assert out["image"].shape == (3, 256, 256) and out["segment"].dtype == torch.bool
    assert out["segment"].shape[-1] == len(np.unique(scene["segment"][:, 8:72]))  # centre square
    coco = COCO(path, mode="instance", with_bbox=True, with_clazz=True)[2]
    assert coco["segment"].shape[-1] == out["segment"].shape[-1]  # empty stuff channel + the objects
    assert not coco["segment"][..., 0].any()
    assert coco["bbox"].shape == (coco["segment"].shape[-1] - 1, 4) and set(coco["clazz"].tolist()) <= {1, 2, 3}


def test_video_readable_as_movi_and_ytvis(tmp_path):
    path = write_synthetic(tmp_path, "train", num=3, video=True, height=48, width=48, num_frames=4)
    out = MOVi(path, with_bbox=True)[1]
    assert out["video"].shape == (4, 3, 256, 256) and out["segment"].shape[:3] == (4, 256, 256)
    assert out["bbox"].shape == (4, out["segment"].shape[-1] - 1, 4)
    raw = LmdbRecords(path).get(1)
    assert len(raw["video"]) == 4 and raw["s"] == raw["bbox"].shape[1]
    # MOVi frames are stored with R and B swapped (as cv2 writes RGB arrays); the reader undoes it
    frame = decode_rgb(raw["video"][0], "t", channels_reversed=True)
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    restored = (out["video"][0, :, 0, 0] * std + mean).round()
    assert restored.tolist() == pytest.approx(frame[0, 0].tolist(), abs=1)
    jpeg = write_synthetic(tmp_path / "yt", "val", num=2, video=True, height=48, width=48, num_frames=3, layout="ytvis")
    out = YTVIS(jpeg, with_clazz=True)[0]
    assert out["video"].shape == (3, 3, 256, 256) and out["clazz"].shape == (3, out["segment"].shape[-1] - 1)


def test_deterministic_and_split_dependent(tmp_path):
    a = LmdbRecords(write_synthetic(tmp_path / "a", "train", num=3, height=32, width=32)).get(1)
    b = LmdbRecords(write_synthetic(tmp_path / "b", "train", num=3, height=32, width=32)).get(1)
    c = LmdbRecords(write_synthetic(tmp_path / "c", "val", num=3, height=32, width=32)).get(1)
    assert a["image"] == b["image"] and a["image"] != c["image"]


def test_command_line(tmp_path):
    main(["--dst", str(tmp_path), "--split", "demo", "--num", "4", "--size", "40", "56", "--jpeg"])
    records = LmdbRecords(tmp_path / "demo.lmdb")
    assert len(records) == 4 and records.get(0)["image"][:2] == b"\xff\xd8"  # JPEG
    assert decode_rgb(records.get(0)["image"], "t").shape == (40, 56, 3)

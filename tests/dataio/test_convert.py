"""Converters from the original layouts, on tiny fake dataset trees; outputs read back by the readers."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from smoothsa.dataio.convert import (
    main,
    movi_record,
    polygons_to_mask,
    rank_codes,
    rle_counts,
    rle_decode,
    rle_encode,
    rle_string,
)
from smoothsa.dataio.datasets import COCO, MOVi, VOC, YTVIS, ClevrTex
from smoothsa.dataio.records import LmdbRecords, decode_index, write_records


def save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def colour_code(rgb):
    return rgb[0] + 256 * rgb[1] + 65536 * rgb[2]


def test_rank_codes_by_hand():
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 1] = [0, 0, 1]  # code 65536
    rgb[1, 2] = [200, 3, 0]  # code 968
    assert rank_codes(rgb).tolist() == [[0, 2, 0], [0, 0, 1]]


def test_clevrtex(tmp_path):
    src = tmp_path / "raw"
    flats = {}
    for split_dir, folder, count in (("clevrtex_full", "0", 2), ("clevrtex_full", "1", 1), ("clevrtex_outd", "0", 1)):
        for i in range(count):
            stem = f"CLEVRTEX_{split_dir.split('_')[1]}_{folder}{i:05d}"
            base = src / split_dir / folder
            flat = np.zeros((24, 32, 3), np.uint8)
            flat[2:8, 3:9] = [255, 0, 0]
            flat[10:20, 20:30] = [0, 0, 9]
            flat[0, 0] = [1, 1, 1]
            flats[stem] = flat
            save(base / f"{stem}.png", np.full((24, 32, 3), 100 + i, np.uint8))
            save(base / f"{stem}_depth_0001.png", np.full((24, 32), 7, np.uint8))
            save(base / f"{stem}_flat.png", flat)
            save(base / f"{stem}_shadow_0001.png", np.zeros((24, 32), np.uint8))  # ignored
    main(["clevrtex", "--src", str(src), "--dst", str(tmp_path / "out")])
    train = LmdbRecords(tmp_path / "out" / "train.lmdb")
    assert len(train) == 3 and len(LmdbRecords(tmp_path / "out" / "val.lmdb")) == 1
    main(["clevrtex", "--src", str(src), "--dst", str(tmp_path / "limited"), "--limit", "2"])
    assert len(LmdbRecords(tmp_path / "limited" / "train.lmdb")) == 2
    segment = decode_index(train.get(0)["segment"], "t")
    # ranks of r + 256 g + 65536 b: black 0, red 255, (1, 1, 1) 65793, blue (0, 0, 9) 589824
    expected = np.zeros((24, 32), np.uint8)
    expected[2:8, 3:9] = 1  # red, code 255
    expected[0, 0] = 2  # code 65793
    expected[10:20, 20:30] = 3  # code 589824
    assert np.array_equal(segment, expected)
    out = ClevrTex(tmp_path / "out" / "val.lmdb")[0]
    assert out["segment"].shape == (256, 256, 3)  # the centre square (columns 4..27) loses pixel (0, 0)


def test_coco(tmp_path):
    src = tmp_path / "coco"
    ids = {"thing_a": 5 + 256 * 1, "stuff": 300, "thing_b": 7}  # deliberately unsorted in the json
    panoptic = np.zeros((30, 40, 3), np.uint8)

    def paint(rows, cols, value):
        panoptic[rows, cols] = [value % 256, (value // 256) % 256, value // 65536]

    paint(slice(0, 10), slice(0, 40), ids["stuff"])
    paint(slice(12, 20), slice(5, 15), ids["thing_a"])
    paint(slice(22, 28), slice(30, 38), ids["thing_b"])
    save(src / "annotations" / "panoptic_val2017" / "000000000139.png", panoptic)
    save(src / "val2017" / "000000000139.jpg", np.full((30, 40, 3), 60, np.uint8), quality=95)
    (src / "panoptic_coco_categories.json").write_text(  # the official layout: at the root
        json.dumps([{"id": 1, "isthing": 1}, {"id": 3, "isthing": 1}, {"id": 184, "isthing": 0}])
    )
    segments_info = [
        {"id": ids["thing_a"], "category_id": 1},
        {"id": ids["stuff"], "category_id": 184},
        {"id": ids["thing_b"], "category_id": 3},
    ]
    (src / "annotations" / "panoptic_val2017.json").write_text(
        json.dumps({"annotations": [{"file_name": "000000000139.png", "segments_info": segments_info}]})
    )
    main(["coco", "--src", str(src), "--dst", str(tmp_path / "out")])
    record = LmdbRecords(tmp_path / "out" / "val.lmdb").get(0)
    # sorted by segment id: thing_b (7) -> 1, thing_a (261) -> 2, stuff (300) -> 3
    assert record["clazz"].tolist() == [3, 1, 184] and record["isthing"].tolist() == [True, True, False]
    segment = decode_index(record["segment"], "t")
    assert segment[25, 33] == 1 and segment[15, 10] == 2 and segment[5, 5] == 3 and segment[11, 0] == 0
    assert record["image"] == (src / "val2017" / "000000000139.jpg").read_bytes()
    out = COCO(tmp_path / "out" / "val.lmdb", mode="instance", with_clazz=True)[0]
    assert out["segment"].shape == (256, 256, 3) and out["clazz"].tolist() == [3, 1]


def test_voc(tmp_path):
    src = tmp_path / "VOCdevkit"
    for year, name in (("VOC2012", "2007_000032"), ("VOC2007", "000033")):
        objects = np.zeros((20, 20), np.uint8)  # palette indices: 0 background, 1, 2 objects, 255 boundary
        objects[2:8, 2:8] = 1
        objects[10:18, 10:18] = 2
        objects[9, :] = 255
        palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192]
        image = Image.frombytes("P", (20, 20), objects.tobytes())  # like the VOC files: a palette PNG
        image.putpalette(palette)
        (src / year / "SegmentationObject").mkdir(parents=True, exist_ok=True)
        image.save(src / year / "SegmentationObject" / f"{name}.png")
        save(src / year / "JPEGImages" / f"{name}.jpg", np.full((20, 20, 3), 30, np.uint8))
    main(["voc", "--src", str(src), "--dst", str(tmp_path / "out")])
    segment = decode_index(LmdbRecords(tmp_path / "out" / "train.lmdb").get(0)["segment"], "t")
    # boundary -> 0; then by code r + 256 g + 65536 b: black 0 -> 1, red (128, 0, 0) 128 -> 2, green 32768 -> 3
    assert segment[9, 0] == 0 and segment[0, 0] == 1 and segment[3, 3] == 2 and segment[12, 12] == 3
    out = VOC(tmp_path / "out" / "val.lmdb")[0]
    assert out["segment"].shape == (256, 256, 3)
    assert out["segment"][..., 0].sum() > out["segment"][..., 1].sum()  # background first


def test_rle_strings_by_hand():
    assert rle_counts("234") == [2, 3, 4] and rle_string([2, 3, 4]) == "234"
    assert rle_counts("1238") == [1, 2, 3, 10]  # counts after the second are differences: 8 + 2
    assert rle_counts("5:2I") == [5, 10, 2, 3]  # 'I' is -7: 3 = 10 - 7
    assert rle_string([5, 10, 2, 3]) == "5:2I"


def test_rle_roundtrip_and_column_major():
    rng = np.random.default_rng(0)
    for shape in [(7, 5), (30, 41), (1, 1)]:
        mask = (rng.random(shape) < 0.3).astype(np.uint8)
        assert np.array_equal(rle_decode(rle_encode(mask), *shape), mask)
    # uncompressed counts run down the columns: 2 zeros, 1 one, 3 zeros in a 3x2 image
    assert rle_decode({"size": [3, 2], "counts": [2, 1, 3]}, 3, 2).tolist() == [[0, 0], [0, 0], [1, 0]]
    with pytest.raises(ValueError, match="covers"):
        rle_decode({"size": [3, 2], "counts": [2, 1]}, 3, 2)


def test_coco_categories_under_annotations_is_refused(tmp_path, capsys):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "panoptic_coco_categories.json").write_text("[]")
    with pytest.raises(SystemExit) as exit_:
        main(["coco", "--src", str(tmp_path), "--dst", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "panoptic_coco_categories.json at the root" in capsys.readouterr().err


def test_clevrtex_orders_part_folders_as_text(tmp_path):
    """12 part folders, one scene each: the official converter sorts full paths as text (0, 1, 10, 11, 2, ...)."""
    src = tmp_path / "raw"
    for folder in range(12):
        stem = f"CLEVRTEX_full_{folder:06d}"
        base = src / "clevrtex_full" / str(folder)
        save(base / f"{stem}.png", np.full((8, 8, 3), folder, np.uint8))  # the image says which folder
        save(base / f"{stem}_depth_0001.png", np.zeros((8, 8), np.uint8))
        save(base / f"{stem}_flat.png", np.zeros((8, 8, 3), np.uint8))
    main(["clevrtex", "--src", str(src), "--dst", str(tmp_path / "out")])
    records = LmdbRecords(tmp_path / "out" / "train.lmdb")
    order = [int(np.asarray(Image.open(__import__("io").BytesIO(records.get(i)["image"])))[0, 0, 0]) for i in range(12)]
    assert order == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]


def test_clevrtex_wrong_folder_fails(tmp_path, capsys):
    (tmp_path / "somewhere").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["clevrtex", "--src", str(tmp_path / "somewhere"), "--dst", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "clevrtex: found no split under" in err and "clevrtex_full" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


POLYGONS = [
    [[2.3, 1.7, 9.6, 2.2, 8.1, 7.9, 1.2, 6.4]],
    [[0.5, 0.5, 11.5, 0.5, 6.0, 9.5], [1, 8, 3, 8, 3, 9.9, 1, 9.9]],  # two parts, merged
    [[1.5, 2.5, 10.2, 4.4, 3.3, 9.1]],
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2
@pytest.mark.parametrize("polygons", POLYGONS)
def test_polygons_match_pycocotools(polygons):
    coco_mask = pytest.importorskip("pycocotools.mask")
    expected = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polygons, 10, 12)))
    mask = polygons_to_mask(polygons, 10, 12)
    assert mask.shape == (10, 12) and mask.dtype == np.uint8 and mask.any()
    assert np.array_equal(mask, expected)


def test_polygons_without_pycocotools_explains(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(ValueError, match=r"pip install 'smoothsa\[convert\]'"):
        polygons_to_mask(POLYGONS[0], 10, 12)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2
def test_ytvis(tmp_path):
    coco_mask = pytest.importorskip("pycocotools.mask")
    src = tmp_path / "ytvis"
    h, w, frames = 16, 24, 3
    names = [f"vid0/{t:05d}.jpg" for t in range(frames)]
    for name in names:
        save(src / "JPEGImages" / name, np.full((h, w, 3), 50, np.uint8))
    first = np.zeros((h, w), np.uint8)
    first[2:10, 2:10] = 1
    second = np.zeros((h, w), np.uint8)
    second[5:12, 5:20] = 1  # overlaps the first track: drawn over it
    annotation = {
        "videos": [
            {"id": 1, "file_names": names, "height": h, "width": w},
            {"id": 2, "file_names": names, "height": h, "width": w},  # no tracks: skipped
        ],
        "annotations": [
            {
                "video_id": 1,
                "category_id": 12,
                "segmentations": [rle_encode(first), None, {"size": [h, w], "counts": [h * w]}],  # empty
            },
            {"video_id": 1, "category_id": 40, "segmentations": [rle_encode(second), [[0.4, 0, 4, 0, 4.6, 4, 0, 4]], None]},
        ],
    }
    (src / "ytvis_hq-train.json").write_text(json.dumps(annotation))
    main(["ytvis", "--src", str(src), "--dst", str(tmp_path / "out"), "--variant", "hq"])
    records = LmdbRecords(tmp_path / "out" / "train.lmdb")
    assert len(records) == 1
    record = records.get(0)
    assert record["s"] == 2 and record["clazz"].tolist() == [[12, 40]] * 3 and len(record["video"]) == 3
    segment = np.stack([decode_index(s, "t") for s in record["segment"]])
    expected0 = np.where(second == 1, 2, first)
    assert np.array_equal(segment[0], expected0)
    polygon = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects([[0.4, 0, 4, 0, 4.6, 4, 0, 4]], h, w)))
    assert polygon.sum() > 10 and np.array_equal(segment[1], polygon * 2) and segment[2].max() == 0
    out = YTVIS(tmp_path / "out" / "train.lmdb", with_clazz=True, with_bbox=True)[0]
    assert out["clazz"].tolist()[0] == [12, 40] and out["bbox"].shape == (3, 2, 4)


def test_ytvis_2022_layout_reads_the_test_ground_truth(tmp_path):
    """YTVIS-2022: train/instances.json, valid/gt.json and test/test_gt.json (RLE masks: no pycocotools needed)."""
    src = tmp_path / "ytvis2022"
    h, w = 8, 10
    for folder, json_name, category in (("train", "instances.json", 3), ("valid", "gt.json", 4), ("test", "test_gt.json", 5)):
        names = [f"v/{t:05d}.jpg" for t in range(2)]
        for name in names:
            save(src / folder / "JPEGImages" / name, np.full((h, w, 3), 9, np.uint8))
        mask = np.zeros((h, w), np.uint8)
        mask[1:1 + category, 2:6] = 1
        annotation = {
            "videos": [{"id": 1, "file_names": names, "height": h, "width": w}],
            "annotations": [{"video_id": 1, "category_id": category, "segmentations": [rle_encode(mask)] * 2}],
        }
        (src / folder / json_name).write_text(json.dumps(annotation))
    (src / "test" / "instances.json").write_text(json.dumps({"videos": [], "annotations": []}))  # not the gt
    main(["ytvis", "--src", str(src), "--dst", str(tmp_path / "out"), "--variant", "2022"])
    for split, category in (("train", 3), ("val", 4), ("test", 5)):
        record = LmdbRecords(tmp_path / "out" / f"{split}.lmdb").get(0)
        assert record["clazz"].tolist() == [[category]] * 2
        assert (decode_index(record["segment"][0], "t") == 1).sum() == category * 4


def test_ytvis_without_annotations_fails(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["ytvis", "--src", str(tmp_path), "--dst", str(tmp_path / "out"), "--variant", "2022"])
    assert exit_.value.code == 2 and "test_gt.json" in capsys.readouterr().err


def test_movi_record_layout_and_reader(tmp_path):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    segmentations = np.zeros((4, 32, 32, 1), np.uint8)
    segmentations[:, 4:10, 4:10] = 1
    segmentations[2:, 20:30, 20:30] = 2
    sample = dict(
        video=video,
        segmentations=segmentations,
        bbox_frames=[np.arange(4), np.array([2, 3])],
        bboxes=[np.tile([0.1, 0.2, 0.3, 0.4], (4, 1)), np.tile([0.5, 0.6, 0.7, 0.8], (2, 1))],
        backward_flow=rng.integers(0, 65535, (4, 32, 32, 2), dtype=np.uint16),
        flow_range=np.array([-3.0, 4.0], np.float32),
        depth=rng.integers(0, 65535, (4, 32, 32, 1), dtype=np.uint16),
        depth_range=np.array([0.1, 9.0], np.float32),
    )
    record = movi_record(sample)
    assert record["s"] == 2 and record["bbox"].dtype == np.float32
    # TFDS y/x order swapped to l, t, r, b; 0 where the instance is not tracked
    assert record["bbox"][0, 0].tolist() == pytest.approx([0.2, 0.1, 0.4, 0.3])
    assert record["bbox"][1, 1].tolist() == [0, 0, 0, 0]
    assert record["bbox"][3, 1].tolist() == pytest.approx([0.6, 0.5, 0.8, 0.7])
    assert len(record["flow"]["data"]) == 2 and len(record["flow"]["data"][0]) == 4
    assert record["depth"]["max"] == pytest.approx(9.0)
    depth = np.asarray(Image.open(__import__("io").BytesIO(record["depth"]["data"][1].tobytes())))
    assert np.array_equal(depth.astype(np.uint16), sample["depth"][1, ..., 0])  # 16-bit PNG, lossless
    path = write_records(tmp_path / "val.lmdb", [record])
    out = MOVi(path)[0]
    mean, std = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1), torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    # validation: 32x32 frames upscaled to 256: output pixel (0, 0) samples source (0, 0) only
    restored = (out["video"][:, :, 0, 0] * std[:, 0, 0] + mean[:, 0, 0]).round()
    assert restored.tolist() == video[:, 0, 0].astype(float).tolist()
    assert out["segment"].shape == (4, 256, 256, 3)


def test_movi_without_tensorflow_explains(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
    with pytest.raises(SystemExit, match=r"pip install 'smoothsa\[movi\]'"):
        main(["movi", "--src", str(tmp_path), "--dst", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "train.lmdb").exists()


def test_failed_conversion_leaves_nothing(tmp_path):
    src = tmp_path / "VOCdevkit"
    for name in ("a", "b"):
        save(src / "VOC2012" / "SegmentationObject" / f"{name}.png", np.zeros((8, 8, 3), np.uint8))
    save(src / "VOC2012" / "JPEGImages" / "a.jpg", np.zeros((8, 8, 3), np.uint8))  # b.jpg missing
    with pytest.raises(FileNotFoundError):
        main(["voc", "--src", str(src), "--dst", str(tmp_path / "out")])
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_src(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["coco", "--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "out")])
    assert "does not exist" in capsys.readouterr().err

"""Readers of the official LMDB layouts (docs/official.md §6): keys, shapes, dtypes and the mask rules, by hand."""

import math
import pickle
import random

import lmdb
import numpy as np
import pytest
import torch

from smoothsa.dataio.datasets import COCO, MOVi, VOC, YTVIS, ClevrTex, boxes_from_masks, present_ids
from smoothsa.dataio.loader import LoaderOptions, make_loader
from smoothsa.dataio.records import RecordError, encode_jpeg, encode_png
from smoothsa.dataio.transforms import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def write_official(path, samples):
    """The official writer: lmdb file, pickled dicts under 000000.., `__keys__` last."""
    env = lmdb.open(str(path), map_size=1024**4, subdir=False, meminit=False)
    keys = [f"{i:06d}".encode() for i in range(len(samples))]
    with env.begin(write=True) as txn:
        for key, sample in zip(keys, samples):
            txn.put(key, pickle.dumps(sample))
    with env.begin(write=True) as txn:
        txn.put(b"__keys__", pickle.dumps(keys))
    env.close()
    return path


def unnormalize(image):
    return (image * STD + MEAN).round().clamp(0, 255).to(torch.uint8)


def nearest(index, size_in, size_out=256):
    return math.floor((index + 0.5) * size_in / size_out)


def clevrtex_sample():
    """240x320 scene: background 0, objects 1, 2 inside the centre square, object 3 only in columns < 40."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    segment = np.zeros((240, 320), np.uint8)
    segment[50:100, 60:120] = 1
    segment[150:200, 200:260] = 2
    segment[10:60, 0:30] = 3  # cut away by the validation centre crop (columns 40..279)
    return dict(image=encode_png(image).tobytes(), segment=encode_png(segment), depth=encode_png(segment)), image, segment


def test_clevrtex_validation(tmp_path):
    record, image, segment = clevrtex_sample()
    dataset = ClevrTex(write_official(tmp_path / "val.lmdb", [record]))
    out = dataset[0]
    assert set(out) == {"image", "segment"}
    assert out["image"].shape == (3, 256, 256) and out["image"].dtype == torch.float32
    assert out["segment"].shape == (256, 256, 3) and out["segment"].dtype == torch.bool  # object 3 dropped
    # every pixel in exactly one channel; channel k = stored index k (0 background, 1, 2)
    assert out["segment"].sum(-1).eq(1).all()
    for i, j in [(0, 0), (60, 40), (200, 230), (255, 255), (100, 110)]:
        value = segment[nearest(i, 240), 40 + nearest(j, 240)]
        assert out["segment"][i, j].nonzero().item() == value
    # the image is the centre square, antialiased down to 256 (within a level after normalising back)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(image[:, 40:280]).permute(2, 0, 1)[None].float(), size=(256, 256), mode="bilinear", antialias=True
    )[0]
    assert (unnormalize(out["image"]).float() - expected).abs().max() <= 1


def test_clevrtex_training_drops_emptied_channels(tmp_path):
    record, _, segment = clevrtex_sample()
    dataset = ClevrTex(write_official(tmp_path / "train.lmdb", [record]), is_training=True)
    counts = set()
    for seed in range(40):
        out = dataset.load(0, seed)
        counts.add(out["segment"].shape[-1])
        assert out["segment"].any(dim=(0, 1)).all()  # no empty channel survives
        assert out["segment"].sum(-1).eq(1).all()
    assert counts <= {3, 4} and 4 in counts  # object 3 is kept by some crops, not by others


def test_voc_drops_boundary(tmp_path):
    image = np.full((200, 200, 3), 90, np.uint8)
    segment = np.ones((200, 200), np.uint8)  # 1 = black background
    segment[40:80, 40:80] = 2
    segment[120:160, 100:180] = 4
    segment[39, 39:81] = 0  # boundary
    segment[:, 199] = 0
    record = dict(image=encode_jpeg(image), segment=encode_png(segment))
    out = VOC(write_official(tmp_path / "val.lmdb", [record]), name="voc")[0]
    assert out["segment"].shape == (256, 256, 3)
    expected = torch.from_numpy(segment)[[nearest(i, 200) for i in range(256)]][:, [nearest(j, 200) for j in range(256)]]
    for k, index in enumerate([1, 2, 4]):  # background first, boundary (0) in no channel
        assert torch.equal(out["segment"][..., k], expected == index)
    assert not out["segment"][expected == 0].any()


def test_coco_panoptic(tmp_path, coco_record):
    record, segment = coco_record
    dataset = COCO(write_official(tmp_path / "val.lmdb", [record]), mode="panoptic", with_bbox=True, with_clazz=True)
    out = dataset[0]
    assert set(out) == {"image", "segment", "bbox", "clazz"}
    assert out["segment"].shape == (256, 256, 4)
    for k, index in enumerate([1, 2, 3, 4]):
        assert torch.equal(out["segment"][..., k], torch.from_numpy(segment == index))
    assert not out["segment"][torch.from_numpy(segment == 0)].any()  # unannotated: in no channel
    assert out["clazz"].dtype == torch.uint8 and out["clazz"].tolist() == [184, 1, 190, 3]
    assert out["bbox"].shape == (4, 4) and out["bbox"].dtype == torch.float32


def test_coco_instance_mode_with_boxes(tmp_path, coco_record):
    record, segment = coco_record
    dataset = COCO(write_official(tmp_path / "val.lmdb", [record]), mode="instance", with_bbox=True, with_clazz=True)
    out = dataset[0]
    assert out["segment"].shape == (256, 256, 3)
    assert torch.equal(out["segment"][..., 0], torch.from_numpy((segment == 1) | (segment == 3)))  # stuff union
    assert torch.equal(out["segment"][..., 1], torch.from_numpy(segment == 2))
    assert torch.equal(out["segment"][..., 2], torch.from_numpy(segment == 4))
    assert out["clazz"].tolist() == [1, 3]
    # l, t, r, b = inclusive pixel indices / W, H
    expected = torch.tensor([[30, 10, 59, 19], [140, 200, 149, 250]]) / 256
    assert torch.allclose(out["bbox"], expected)


def test_coco_instance_mode_without_stuff_keeps_empty_background(tmp_path):
    segment = np.zeros((64, 64), np.uint8)
    segment[5:9, 5:9] = 1
    record = dict(
        image=encode_jpeg(np.zeros((64, 64, 3), np.uint8)),
        segment=encode_png(segment),
        clazz=np.array([7], np.uint8),
        isthing=np.array([True]),
    )
    out = COCO(write_official(tmp_path / "val.lmdb", [record]), mode="instance")[0]
    assert out["segment"].shape == (256, 256, 2)
    assert not out["segment"][..., 0].any() and out["segment"][..., 1].sum() == 16 * 16


def test_coco_training_drops_cropped_things(tmp_path, coco_record):
    record, _ = coco_record
    dataset = COCO(write_official(tmp_path / "train.lmdb", [record]), True, mode="instance", with_bbox=True, with_clazz=True)
    seen = set()
    for seed in range(30):
        out = dataset.load(0, seed)
        count = out["segment"].shape[-1] - 1
        assert out["bbox"].shape == (count, 4) and out["clazz"].shape == (count,)
        assert out["segment"][..., 1:].any(dim=(0, 1)).all()
        boxes = out["bbox"]
        assert (boxes[:, :2] <= boxes[:, 2:]).all() and ((boxes >= 0) & (boxes < 1)).all()
        assert torch.allclose(boxes, boxes_from_masks(out["segment"][..., 1:]))
        seen.add(tuple(out["clazz"].tolist()))
    assert (1, 3) in seen and len(seen) > 1  # the small thing 2 is cropped away sometimes


def test_boxes_from_masks_by_hand():
    masks = torch.zeros(2, 4, 5, 3, dtype=torch.bool)  # (T, H, W, n)
    masks[0, 1:3, 2:5, 0] = True
    masks[1, 3, 0, 0] = True
    masks[0, 1, 1, 1] = True
    boxes = boxes_from_masks(masks)
    assert boxes.shape == (2, 3, 4)
    assert boxes[0, 0].tolist() == pytest.approx([2 / 5, 1 / 4, 4 / 5, 2 / 4])
    assert boxes[1, 0].tolist() == pytest.approx([0, 3 / 4, 0, 3 / 4])
    assert boxes[0, 1].tolist() == pytest.approx([1 / 5, 1 / 4, 1 / 5, 1 / 4])
    assert boxes[1, 1].tolist() == [0, 0, 0, 0] and boxes[:, 2].eq(0).all()  # empty masks


def test_present_ids():
    segment = torch.tensor([[0, 3], [3, 7]], dtype=torch.uint8)
    assert present_ids(segment).tolist() == [0, 3, 7]
    assert present_ids(segment, drop=(0,)).tolist() == [3, 7]


def movi_sample(frames=4):
    """256x256 clip, s = 3; object 3 never visible; object 2 absent in frame 1."""
    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, (frames, 256, 256, 3), dtype=np.uint8)
    segment = np.zeros((frames, 256, 256), np.uint8)
    for t in range(frames):
        segment[t, 20 + t : 40 + t, 30:50] = 1
        if t != 1:
            segment[t, 100:120, 200 - t : 230 - t] = 2
    record = dict(
        video=[encode_png(frame[..., ::-1]) for frame in video],  # cv2.imencode of RGB arrays
        segment=[encode_png(frame) for frame in segment],
        s=3,
        bbox=np.full((frames, 3, 4), 7.0, np.float32),  # stored boxes are never used
        flow=dict(data=[[encode_png(np.zeros((256, 256), np.uint16))] * frames] * 2, min=-1.0, max=1.0),
        depth=dict(data=[encode_png(np.zeros((256, 256), np.uint16))] * frames, min=0.0, max=1.0),
    )
    return record, video, segment


def test_movi_validation(tmp_path):
    record, video, segment = movi_sample()
    dataset = MOVi(write_official(tmp_path / "val.lmdb", [record]), with_bbox=True, name="movi_c")
    out = dataset[0]
    assert set(out) == {"video", "segment", "bbox"}
    assert out["video"].shape == (4, 3, 256, 256) and out["video"].dtype == torch.float32
    assert torch.equal(unnormalize(out["video"]), torch.from_numpy(video).permute(0, 3, 1, 2))  # RGB restored
    assert out["segment"].shape == (4, 256, 256, 3) and out["segment"].dtype == torch.bool
    for k in range(3):
        assert torch.equal(out["segment"][..., k], torch.from_numpy(segment == k))
    bbox = out["bbox"]
    assert bbox.shape == (4, 2, 4) and bbox.dtype == torch.float32
    assert bbox[2, 0].tolist() == pytest.approx([30 / 256, 22 / 256, 49 / 256, 41 / 256])
    assert bbox[3, 1].tolist() == pytest.approx([197 / 256, 100 / 256, 226 / 256, 119 / 256])
    assert bbox[1, 1].tolist() == [0, 0, 0, 0]  # object 2 absent in frame 1


def test_movi_training_clip(tmp_path):
    record, _, segment = movi_sample(frames=6)
    dataset = MOVi(write_official(tmp_path / "train.lmdb", [record]), is_training=True, clip_length=2, with_bbox=True)
    starts = set()
    for seed in range(20):
        out = dataset.load(0, seed)
        assert out["video"].shape == (2, 3, 256, 256) and out["segment"].shape[:3] == (2, 256, 256)
        assert out["bbox"].shape == (2, out["segment"].shape[-1] - 1, 4)
        _, rng = dataset.rngs(0, seed)
        starts.add(dataset.encoded(0, rng).fields["clip"].start)
    assert starts == {0, 2, 4}


def ytvis_sample(frames):
    rng = np.random.default_rng(2)
    segment = np.zeros((frames, 64, 96), np.uint8)
    segment[:, 10:30, 10:30] = 1
    segment[: frames // 2, 40:60, 50:90] = 2  # track 2 only in the first half
    video = rng.integers(0, 256, (frames, 64, 96, 3), dtype=np.uint8)
    return dict(
        video=[encode_jpeg(frame) for frame in video],
        segment=[encode_png(frame) for frame in segment],
        s=3,
        clazz=np.tile(np.array([12, 34, 40], np.uint8), (frames, 1)),  # track 3 never visible
    )


def test_ytvis_validation_and_classes(tmp_path):
    dataset = YTVIS(write_official(tmp_path / "val.lmdb", [ytvis_sample(6)]), with_bbox=True, with_clazz=True)
    out = dataset[0]
    assert set(out) == {"video", "segment", "bbox", "clazz"}
    assert out["video"].shape == (6, 3, 256, 256) and out["segment"].shape == (6, 256, 256, 3)
    assert out["clazz"].shape == (6, 2) and out["clazz"].dtype == torch.uint8
    assert (out["clazz"] == torch.tensor([12, 34], dtype=torch.uint8)).all()
    assert out["bbox"].shape == (6, 2, 4)
    assert out["bbox"][4, 1].eq(0).all() and out["bbox"][0, 1].gt(0).any()


def test_ytvis_training_repeats_long_videos(tmp_path):
    path = write_official(tmp_path / "train.lmdb", [ytvis_sample(65), ytvis_sample(20), ytvis_sample(31)])
    dataset = YTVIS(path, is_training=True, clip_length=5, repeat_every=30, with_clazz=True)
    assert dataset.index == [0, 0, 1, 2]
    out = dataset.load(3, seed=1)
    assert out["video"].shape == (5, 3, 256, 256) and out["clazz"].shape[0] == 5
    assert len(YTVIS(path, is_training=False, repeat_every=30)) == 3  # validation lists each video once


def test_broken_image_is_an_error_not_black(tmp_path, coco_record):
    record, _ = coco_record
    broken = dict(record, image=record["image"][: len(record["image"]) // 3])
    dataset = COCO(write_official(tmp_path / "val.lmdb", [record, broken]))
    dataset[0]
    with pytest.raises(RecordError, match=r"coco/val key 000001 field 'image': cannot decode"):
        dataset[1]


def test_broken_segment_and_missing_field(tmp_path):
    record, _, _ = clevrtex_sample()
    path = write_official(
        tmp_path / "train.lmdb",
        [dict(record, segment=np.frombuffer(b"junk", np.uint8)), {"image": record["image"]}],
    )
    dataset = ClevrTex(path, name="clevrtex")
    with pytest.raises(RecordError, match=r"clevrtex/train key 000000 field 'segment': cannot decode"):
        dataset[0]
    with pytest.raises(RecordError, match=r"clevrtex/train key 000001: the record has no field 'segment'"):
        dataset[1]


def test_unsafe_record_through_reader(tmp_path, coco_record):
    record, _ = coco_record
    path = write_official(tmp_path / "val.lmdb", [dict(record, clazz=print)])
    with pytest.raises(RecordError, match=r"coco/val key 000000: refusing to unpickle 'builtins.print'"):
        COCO(path)[0]


def test_index_beyond_stored_objects(tmp_path):
    record, _, _ = movi_sample()
    path = write_official(tmp_path / "val.lmdb", [dict(record, s=1)])
    with pytest.raises(RecordError, match="segment index 2 > s = 1"):
        MOVi(path)[0]


def test_readers_pickle_and_work_in_workers(tmp_path):
    record, _, _ = clevrtex_sample()
    path = write_official(tmp_path / "train.lmdb", [record] * 6)
    dataset = ClevrTex(path, is_training=True)
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone.load(2, 5)["image"], dataset.load(2, 5)["image"])  # this process now holds an open environment
    # forked workers inherit it and must open their own; same seed -> the same batches as in-process
    serial = list(make_loader(dataset, LoaderOptions(batch_size=4, seed=11, drop_last=False)))
    parallel = list(make_loader(dataset, LoaderOptions(batch_size=4, workers=2, seed=11, drop_last=False)))
    assert len(serial) == len(parallel) == 2
    for a, b in zip(serial, parallel):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["segment"], b["segment"])


def test_loader_epochs_differ_and_repeat_with_seed(tmp_path):
    record, _, _ = clevrtex_sample()
    dataset = ClevrTex(write_official(tmp_path / "train.lmdb", [record] * 4), is_training=True)
    loader = make_loader(dataset, LoaderOptions(batch_size=4, seed=3))
    first, second = next(iter(loader))["image"], next(iter(loader))["image"]
    assert not torch.equal(first, second)  # a new epoch draws new augmentations
    again = make_loader(dataset, LoaderOptions(batch_size=4, seed=3))
    assert torch.equal(next(iter(again))["image"], first)
    assert not torch.equal(first[0], first[1])  # samples of one epoch differ (same record, different crops)


def test_global_rng_without_loader(tmp_path):
    """Indexed directly, a reader draws from the global RNGs like the official code."""
    record, _, _ = clevrtex_sample()
    dataset = ClevrTex(write_official(tmp_path / "train.lmdb", [record]), is_training=True)
    torch.manual_seed(0)
    random.seed(0)
    a = dataset[0]["image"]
    torch.manual_seed(0)
    random.seed(0)
    assert torch.equal(dataset[0]["image"], a)


def test_epoch_order_shards_ranks():
    from smoothsa.dataio.epochs import epoch_order

    full = epoch_order(10, 3, 1, True)
    assert sorted(full) == list(range(10)) and full != list(range(10))
    assert full == epoch_order(10, 3, 1, True) != epoch_order(10, 3, 2, True)
    shards = [epoch_order(10, 3, 1, True, rank, 4) for rank in range(4)]
    assert [len(s) for s in shards] == [3, 3, 3, 3]  # padded by wrap-around to 12
    assert sorted(sum(shards, [])) == sorted(full + full[:2])
    assert epoch_order(5, 0, 0, False, 1, 2) == [1, 3, 0]


def test_loader_rank_length(tmp_path):
    record, _, _ = clevrtex_sample()
    dataset = ClevrTex(write_official(tmp_path / "val.lmdb", [record] * 5))
    loader = make_loader(dataset, LoaderOptions(batch_size=2, rank=1, world_size=2))
    batches = list(loader)
    assert len(loader) == len(batches) == 2 and [b["image"].shape[0] for b in batches] == [2, 1]


def test_corrupt_segment_names_dataset_split_key_and_field(tmp_path):
    image = np.full((20, 20, 3), 90, np.uint8)
    segment = np.ones((20, 20), np.uint8)
    segment[4:9, 4:12] = 2
    png = bytearray(encode_png(segment).tobytes())
    png[len(png) // 2] ^= 0x04  # one bit inside the image data
    records = [dict(image=encode_jpeg(image), segment=encode_png(segment)), dict(image=encode_jpeg(image), segment=bytes(png))]
    dataset = VOC(write_official(tmp_path / "val.lmdb", records))
    assert dataset[0]["segment"].shape == (256, 256, 2)
    with pytest.raises(RecordError, match=r"voc/val key 000001 field 'segment': cannot decode the image \(corrupt PNG"):
        dataset[1]


def test_loaders_pass_the_epoch_seed_and_leave_the_reader_alone(tmp_path):
    record, _, _ = clevrtex_sample()
    dataset = ClevrTex(write_official(tmp_path / "train.lmdb", [record] * 3), is_training=True)
    before = dict(vars(dataset))
    loader = make_loader(dataset, LoaderOptions(batch_size=3, seed=4))
    loader.set_epoch(2)
    batch = next(iter(loader))
    assert vars(dataset).keys() == before.keys() and not hasattr(dataset, "augment_seed")
    from smoothsa.dataio.epochs import augment_seed, epoch_order

    order = epoch_order(3, 4, 2, True)
    for position, index in enumerate(order):  # sample i of epoch e is drawn from augment_seed(seed, e)
        assert torch.equal(batch["image"][position], dataset.load(index, augment_seed(4, 2))["image"])


def test_loader_keys_select_what_batches_carry(tmp_path, coco_record):
    record, _ = coco_record
    path = write_official(tmp_path / "val.lmdb", [record] * 2)
    dataset = COCO(path, with_bbox=True, with_clazz=True)
    assert dataset.keys == ("image", "segment", "bbox", "clazz")
    batch = next(iter(make_loader(dataset, LoaderOptions(batch_size=2, keys=("image", "bbox")))))
    assert list(batch) == ["image", "bbox"] and batch["bbox"].shape == (2, 2, 4)
    assert list(next(iter(make_loader(COCO(path, with_segment=False), LoaderOptions(batch_size=2))))) == ["image"]
    with pytest.raises(ValueError, match=r"coco/val: the loader was asked for 'depth'"):
        make_loader(dataset, LoaderOptions(keys=("image", "depth")))
    with pytest.raises(ValueError, match="with_segment"):
        COCO(path, with_segment=False, with_bbox=True)


def test_empty_split_is_an_error(tmp_path):
    dataset = ClevrTex(write_official(tmp_path / "val.lmdb", []), name="clevrtex")
    with pytest.raises(ValueError, match=r"clevrtex/val: the split holds no samples"):
        make_loader(dataset, LoaderOptions())


def test_loader_options_are_checked():
    with pytest.raises(ValueError, match="backend must be one of torch, torch-gpu, dali"):
        LoaderOptions(backend="cuda")
    with pytest.raises(ValueError, match="rank 2 outside 0..1"):
        LoaderOptions(rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        LoaderOptions(batch_size=0)
    assert LoaderOptions(keys=["image"]).keys == ("image",)


def test_open_dataset_registry(tmp_path, coco_record):
    from smoothsa.dataio.registry import DATASETS, open_dataset

    record, _ = coco_record
    path = write_official(tmp_path / "train.lmdb", [record])
    coco = open_dataset("coco", path, True, with_bbox=True)
    assert isinstance(coco, COCO) and coco.mode == "instance" and coco.is_training and coco.keys[-1] == "bbox"
    assert open_dataset("coco", path, coco_mode="panoptic").mode == "panoptic"
    movie = write_official(tmp_path / "val.lmdb", [movi_sample()[0]])
    video = open_dataset("movi_e", movie, clip_length=3, with_bbox=True)
    assert isinstance(video, MOVi) and video.clip_length is None and video.location == "movi_e/val"  # whole videos
    assert open_dataset("synthetic", path).name == "synthetic" and DATASETS["synthetic_video"] is MOVi
    with pytest.raises(ValueError, match="unknown dataset 'cityscapes'"):
        open_dataset("cityscapes", path)
    with pytest.raises(ValueError, match="voc: this reader has no boxes"):
        open_dataset("voc", path, with_bbox=True)

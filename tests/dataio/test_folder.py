"""Your own folder of images or videos: conversion to the official layout, the readers, training batches."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smoothsa.build import build_model
from smoothsa.data import LoaderOptions, build_dataset, build_loader
from smoothsa.dataio.convert import main as convert_main
from smoothsa.dataio.folder import (
    FolderImages,
    FolderVideos,
    convert_folder,
    find_videos,
    natural_key,
    split_inputs,
)
from smoothsa.dataio.records import LmdbRecords, RecordError, decode_rgb
from smoothsa.presets import apply_overrides, get_preset
from smoothsa.tasks import task_for


def picture(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def photos(tmp_path):
    """Six inputs of odd sizes and formats, one nested, plus a broken JPEG and a text file."""
    src = tmp_path / "photos"
    (src / "nested").mkdir(parents=True)
    arrays = {}
    for i, (name, size) in enumerate([("a.png", (37, 53)), ("b.png", (64, 30)), ("nested/c.png", (41, 41)),
                                      ("d.bmp", (20, 70)), ("e.webp", (33, 29)), ("f.jpg", (48, 40))]):
        arrays[name] = picture(*size, seed=i)
        Image.fromarray(arrays[name]).save(src / name, **({"lossless": True} if name.endswith(".webp") else {}))
    Image.fromarray(picture(12, 16, 9)[..., 0]).save(src / "gray.png")  # grayscale: replicated to RGB
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (src / "notes.txt").write_text("not an image")
    return src, arrays


def stored_images(path) -> list[np.ndarray]:
    records = LmdbRecords(path)
    return [decode_rgb(records.get(i)["image"], "test") for i in range(len(records))]


def test_images_convert_to_both_splits(photos, tmp_path, capsys):
    src, arrays = photos
    written = convert_folder(src, tmp_path / "out", val_fraction=0.3)
    assert [p.name for p in written] == ["train.lmdb", "val.lmdb"]
    assert "broken.jpg" in capsys.readouterr().err
    images = stored_images(written[0]) + stored_images(written[1])
    assert len(images) == 7  # 8 image files, one unreadable
    for name, array in arrays.items():
        if not name.endswith(".jpg"):  # lossless formats come back pixel for pixel
            assert sum(np.array_equal(image, array) for image in images) == 1, name
    assert any(image.shape == (12, 16, 3) and (image[..., 0] == image[..., 2]).all() for image in images)
    jpeg = (src / "f.jpg").read_bytes()
    all_bytes = [LmdbRecords(p).get(i)["image"] for p in written for i in range(len(LmdbRecords(p)))]
    assert jpeg in all_bytes  # JPEG and PNG files are stored as they are
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_split_is_seeded_and_keeps_order():
    inputs = [f"x{i}" for i in range(20)]
    train, val = split_inputs(inputs, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15 and sorted(train + val) == sorted(inputs)
    assert train == [x for x in inputs if x in train] and (train, val) == split_inputs(inputs, 0.25, seed=3)
    few_train, few_val = split_inputs(["a", "b"], 0.01)  # at least one in val, never all
    assert len(few_train) == len(few_val) == 1
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="val-fraction"):
            split_inputs(inputs, bad)
    with pytest.raises(ValueError, match="at least 2"):
        split_inputs(["only"], 0.5)


def test_natural_order():
    names = ["f10.png", "f2.png", "f1.png", "g.png"]
    assert sorted(names, key=lambda n: natural_key(Path(n))) == ["f1.png", "f2.png", "f10.png", "g.png"]


def test_reader_returns_images_without_segments(photos, tmp_path):
    src, _ = photos
    convert_folder(src, tmp_path / "out", val_fraction=0.3)
    preset = apply_overrides(get_preset("demo"), ["data.dataset=folder"])
    dataset = build_dataset(preset, tmp_path / "out", "val", is_training=False)
    assert isinstance(dataset, FolderImages)
    sample = dataset[0]
    assert list(sample) == ["image"] and sample["image"].shape == (3, 128, 128) and sample["image"].dtype == torch.float32
    with pytest.raises(RecordError, match="--video"):
        FolderVideos(tmp_path / "out" / "train.lmdb")


def test_an_image_preset_trains_on_folder_batches(photos, tmp_path):
    src, _ = photos
    convert_folder(src, tmp_path / "out", val_fraction=0.3)
    preset = apply_overrides(get_preset("demo"), ["data.dataset=folder"])
    loader = build_loader(preset, tmp_path / "out", "train", LoaderOptions(batch_size=2, seed=0))
    batch = next(iter(loader))
    assert sorted(batch) == ["image"] and batch["image"].shape == (2, 3, 128, 128)
    model = build_model(preset.model)
    task = task_for(preset)
    terms = task.losses(task.forward(model, batch), batch)
    loss = sum(terms.values())
    loss.backward()
    assert torch.isfinite(loss) and model.encode_project[1].weight.grad.abs().sum() > 0


def write_video(path, frames: np.ndarray, rate: int = 5) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture
def clips(tmp_path):
    """Two folders of frames (7 and 4 frames, named so that text order is wrong) and one small video file."""
    src = tmp_path / "clips"
    for name, count, size in (("walk", 7, (30, 44)), ("run", 4, (50, 36))):
        (src / name).mkdir(parents=True)
        for t in range(count):
            value = np.full((*size, 3), 20 * t, np.uint8)  # frame t is uniform grey 20·t
            Image.fromarray(value).save(src / name / f"frame{t}.png")
    return src


def stored_videos(path) -> list[list[np.ndarray]]:
    records = LmdbRecords(path)
    return [[decode_rgb(f, "test") for f in records.get(i)["video"]] for i in range(len(records))]


def test_frame_folders_convert_in_frame_order(clips, tmp_path):
    (clips / "walk" / "frame10.png").write_bytes((clips / "walk" / "frame6.png").read_bytes())
    assert [p.name for p in find_videos(clips)] == ["run", "walk"]
    written = convert_folder(clips, tmp_path / "out", val_fraction=0.5, video=True)
    videos = stored_videos(written[0]) + stored_videos(written[1])
    lengths = sorted(len(v) for v in videos)
    assert lengths == [4, 8]
    walk = max(videos, key=len)
    assert [int(f[0, 0, 0]) for f in walk] == [0, 20, 40, 60, 80, 100, 120, 120]


def test_video_files_convert_and_train(clips, tmp_path):
    frames = np.stack([np.full((32, 48, 3), 30 * t, np.uint8) for t in range(6)])
    write_video(clips / "movie.mp4", frames)
    written = convert_folder(clips, tmp_path / "out", val_fraction=0.3, video=True)
    videos = stored_videos(written[0]) + stored_videos(written[1])
    movie = [v for v in videos if v[0].shape == (32, 48, 3)]
    assert len(movie) == 1 and len(movie[0]) == 6
    assert np.abs(np.stack(movie[0]).astype(int) - frames).mean() < 3  # mpeg4, then JPEG: close, not equal

    preset = apply_overrides(get_preset("smoothsav_r-ytvis"), [
        "data.dataset=folder_video", "data.clip_len=3", "model.backbone=patch", "model.image_size=32", "model.grid=4",
        "model.feature_dim=16", "model.slot_dim=16", "model.decoder_layers=1", "model.num_slots=3"])
    train = build_dataset(preset, tmp_path / "out", "train", is_training=True)
    val = build_dataset(preset, tmp_path / "out", "val", is_training=False)
    assert isinstance(train, FolderVideos) and train[0]["video"].shape == (3, 3, 32, 32)
    assert [val[i]["video"].shape[0] for i in range(len(val))] == [len(v) for v in stored_videos(written[1])]
    batch = next(iter(build_loader(preset, tmp_path / "out", "train", LoaderOptions(batch_size=2, seed=0))))
    model = build_model(preset.model)
    task = task_for(preset)
    terms = task.losses(task.forward(model, batch), batch)
    assert set(terms) == {"recon", "ssc", "preheat"} and all(torch.isfinite(v) for v in terms.values())
    with pytest.raises(RecordError, match="without --video"):
        FolderImages(tmp_path / "out" / "train.lmdb")


def test_box_conditioned_presets_are_refused(clips, tmp_path):
    convert_folder(clips, tmp_path / "out", val_fraction=0.5, video=True)
    preset = apply_overrides(get_preset("smoothsav_c-movi_c"), ["data.dataset=folder_video"])
    with pytest.raises(ValueError, match="boxes"):
        build_dataset(preset, tmp_path / "out", "train", is_training=True)


def test_command_line(photos, tmp_path, capsys):
    src, _ = photos
    written = convert_main(["folder", "--src", str(src), "--dst", str(tmp_path / "out"), "--val-fraction", "0.2"])
    assert [p.name for p in written] == ["train.lmdb", "val.lmdb"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"junk")
    (empty / "other.jpg").write_bytes(b"junk")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        convert_main(["folder", "--src", str(empty), "--dst", str(tmp_path / "nothing")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "could be read" in err and "Traceback" not in err
    assert not (tmp_path / "nothing" / "train.lmdb").exists()


def test_the_dali_loader_reads_folder_images(photos, tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI not installed (pip install nvidia-dali-cuda120)")
    from smoothsa.dataio.loader import make_loader

    src, _ = photos
    convert_folder(src, tmp_path / "out", val_fraction=0.3)
    dataset = FolderImages(tmp_path / "out" / "val.lmdb", is_training=False, resolution=64)
    torch_batch = next(iter(make_loader(dataset, LoaderOptions(batch_size=2, backend="torch"))))
    dali_batch = next(iter(make_loader(dataset, LoaderOptions(batch_size=2, backend="dali", workers=1))))
    assert sorted(dali_batch) == ["image"] and dali_batch["image"].shape == torch_batch["image"].shape
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # DALI's antialiasing differs at the border
    assert (dali_batch["image"][inner] - torch_batch["image"][inner]).abs().max() < 0.1

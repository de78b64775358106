"""`python -m smoothsa.infer` and `segment`: tiny models with random weights, saved by the tests."""
import hashlib
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from smoothsa.build import build_model
from smoothsa.checkpoint import official_state_dict
from smoothsa.dataio.transforms import derive_seed
from smoothsa.infer import main, masks_at_input_size, segment
from smoothsa.presets import apply_overrides, get_preset

SIZES = {"a.png": (37, 53), "b.png": (64, 30), "nested/c.jpg": (41, 41)}
VIDEO_SET = ["model.backbone=patch", "model.image_size=32", "model.grid=4", "model.feature_dim=16",
             "model.slot_dim=16", "model.decoder_layers=1", "model.num_slots=3"]


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """Two flat halves with noise: something for the slots to split."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = rng.integers(0, 256, 3)
    image[:, width // 2 :] = rng.integers(0, 256, 3)
    return np.clip(image + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)


def save_checkpoint(model, path):
    with torch.no_grad():  # move away from the initial weights so that slots differ
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(parameter.numel())))
    torch.save(official_state_dict(model), path)
    return path


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(build_model("demo"), tmp_path_factory.mktemp("ckpt") / "demo.pth")


@pytest.fixture
def photos(tmp_path):
    src = tmp_path / "photos"
    (src / "nested").mkdir(parents=True)
    for i, (name, size) in enumerate(SIZES.items()):
        Image.fromarray(picture(*size, seed=i)).save(src / name, quality=95)
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    (src / "notes.txt").write_text("ignored inside a folder, named when given")
    return src


def run(*argv):
    return main([str(a) for a in argv])


def test_images_of_odd_sizes(demo_ckpt, photos, tmp_path, capsys):
    out = tmp_path / "out"
    summary = run("--preset", "demo", "--ckpt", demo_ckpt, photos, photos / "notes.txt", tmp_path / "missing.png",
                  "--out", out, "--batch-size", 2)
    err = capsys.readouterr().err
    assert "broken.png" in err and "notes.txt" in err and "missing.png" in err
    stems = {"a": SIZES["a.png"], "b": SIZES["b.png"], "nested__c": SIZES["nested/c.jpg"]}
    assert sorted(e["input"].rsplit("/", 1)[-1] for e in summary["inputs"]) == ["a.png", "b.png", "c.jpg"]
    for stem, (height, width) in stems.items():
        masks = np.asarray(Image.open(out / f"{stem}.masks.png"))
        assert masks.shape == (height, width) and masks.dtype == np.uint8 and masks.max() < 5
        slots = np.load(out / f"{stem}.slots.npy")
        assert slots.shape == (5, 64) and slots.dtype == np.float32 and np.isfinite(slots).all()
        with Image.open(out / f"{stem}.png") as shown:
            assert shown.height > 256 and shown.width > 7 * 256 * width / height - 7
    entry = next(e for e in summary["inputs"] if e["input"].endswith("a.png"))
    masks = np.asarray(Image.open(out / "a.masks.png"))
    assert entry["slot_areas"] == [round(float((masks == s).mean()), 6) for s in range(5)]
    written = json.loads((out / "summary.json").read_text())
    assert written["seed"] == 0 and written["preset"] == "demo" and len(written["skipped"]) == 3


def test_two_runs_write_identical_files(demo_ckpt, photos, tmp_path):
    outs = [tmp_path / "one", tmp_path / "two"]
    for out in outs:
        run("--preset", "demo", "--ckpt", demo_ckpt, photos, "--out", out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert len(names) == 10 and names == sorted(p.name for p in outs[1].iterdir())
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    run("--preset", "demo", "--ckpt", demo_ckpt, photos, "--out", tmp_path / "seed1", "--seed", 1)
    assert (tmp_path / "seed1" / "a.slots.npy").read_bytes() != (outs[0] / "a.slots.npy").read_bytes()


def test_nothing_readable_exits_non_zero(demo_ckpt, tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    with pytest.raises(SystemExit) as exit_:
        run("--preset", "demo", "--ckpt", demo_ckpt, tmp_path / "bad.jpg", tmp_path / "nope", "--out", tmp_path / "o")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "nothing to segment" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "summary.json").exists()


def test_presets_that_need_boxes_are_refused(demo_ckpt, photos, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run("--preset", "smoothsav_c-movi_c", "--ckpt", demo_ckpt, photos, "--out", tmp_path / "o")
    assert exit_.value.code == 2 and "box" in capsys.readouterr().err


def test_masks_outside_the_centre_square_take_the_nearest_prediction():
    attention = torch.tensor([[[0.9, 0.1], [0.8, 0.3]], [[0.1, 0.9], [0.2, 0.7]]])  # (S=2, 2, 2): left | right
    masks = masks_at_input_size(attention, 2, 4)  # the square is columns 1..2
    assert masks.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    tall = masks_at_input_size(attention, 6, 2)  # the square is rows 2..3
    assert tall.tolist() == [[0, 1]] * 6


def test_segment_api(demo_ckpt):
    model = build_model("demo")
    model.load_state_dict({k[2:]: v for k, v in torch.load(demo_ckpt, weights_only=True).items()})
    images = np.stack([picture(40, 50, 0), picture(40, 50, 1)])
    result = segment(model, images, seed=0)
    assert result.masks.shape == (2, 40, 50) and result.masks.dtype == torch.uint8
    assert result.slots.shape == (2, 5, 64) and result.attention.shape == (2, 5, 16, 16)
    assert int(result.masks.max()) < 5
    assert torch.equal(result.masks[:, :, :5], result.masks[:, :, 5:6].expand(-1, -1, 5))  # left of the square
    again = segment(model, torch.from_numpy(images), seed=0)
    assert torch.equal(again.slots, result.slots) and torch.equal(again.masks, result.masks)
    single = segment(model, images[1:], seed=[derive_seed(0, 1)])  # the second input's seed, alone
    torch.testing.assert_close(single.slots[0], result.slots[1], rtol=1e-4, atol=1e-5)
    mixed = segment(model, [images[0], picture(30, 20, 2)], seed=0)
    assert [tuple(m.shape) for m in mixed.masks] == [(40, 50), (30, 20)]
    torch.testing.assert_close(mixed.slots[0], result.slots[0], rtol=1e-4, atol=1e-5)  # another batch, same noise
    with pytest.raises(ValueError, match="uint8"):
        segment(model, images.astype(np.float32))


def write_frames(folder, count, size, seed):
    folder.mkdir(parents=True)
    for t in range(count):
        Image.fromarray(picture(*size, seed=seed + t)).save(folder / f"frame{t}.png")


def test_video_preset_on_frames_and_a_video_file(tmp_path):
    preset = apply_overrides(get_preset("smoothsav_r-ytvis"), VIDEO_SET)
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(preset.model), tmp_path / "video.pth")
    write_frames(tmp_path / "in" / "walk", 4, (30, 44), seed=0)
    inputs = [tmp_path / "in"]
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / "in" / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.height, stream.width, stream.pix_fmt = 24, 36, "yuv420p"
        for t in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture(24, 36, t), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = tmp_path / "out"
    sets = [x for s in VIDEO_SET for x in ("--set", s)]
    summary = run("--preset", "smoothsav_r-ytvis", "--ckpt", ckpt, *inputs, "--out", out, *sets)
    assert sorted(e["frames"] for e in summary["inputs"]) == [3, 4]
    for stem, (frames, height, width) in {"walk": (4, 30, 44), "clip": (3, 24, 36)}.items():
        masks = np.load(out / f"{stem}.masks.npy")
        assert masks.shape == (frames, height, width) and masks.dtype == np.uint8 and masks.max() < 3
        slots = np.load(out / f"{stem}.slots.npy")
        assert slots.shape == (frames, 3, 16) and slots.dtype == np.float32
        with Image.open(out / f"{stem}.gif") as gif:
            assert gif.n_frames == frames
    again = run("--preset", "smoothsav_r-ytvis", "--ckpt", ckpt, *inputs, "--out", tmp_path / "again", *sets)
    assert again == json.loads((out / "summary.json").read_text()) | {}
    for name in ("walk.gif", "walk.masks.npy", "clip.slots.npy"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_video_files_without_pyav_name_the_extra(tmp_path, monkeypatch, capsys):
    preset = apply_overrides(get_preset("smoothsav_r-ytvis"), VIDEO_SET)
    ckpt = save_checkpoint(build_model(preset.model), tmp_path / "video.pth")
    (tmp_path / "clip.mp4").write_bytes(b"anything")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with pytest.raises(SystemExit) as exit_:
        run("--preset", "smoothsav_r-ytvis", "--ckpt", ckpt, tmp_path / "clip.mp4", "--out", tmp_path / "o",
            *[x for s in VIDEO_SET for x in ("--set", s)])
    assert exit_.value.code == 2 and 'pip install -e ".[video]"' in capsys.readouterr().err


def test_a_checkpoint_without_backbone_takes_backbone_weights(tmp_path):
    """A head-only checkpoint (built with backbone=False) runs with --backbone-weights; the banner names them."""
    torch.manual_seed(0)
    full = build_model("smoothsa_r-coco")
    with torch.no_grad():
        for parameter in full.encode_backbone.parameters():
            parameter.normal_(0, 0.02)
    torch.save(official_state_dict(full), tmp_path / "backbone.pth")
    head = build_model("smoothsa_r-coco", backbone=False)
    head.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("encode_backbone")})
    torch.save(official_state_dict(head), tmp_path / "head.pth")
    Image.fromarray(picture(20, 30, 0)).save(tmp_path / "x.png")
    summary = run("--preset", "smoothsa_r-coco", "--ckpt", tmp_path / "head.pth", tmp_path / "x.png",
                  "--backbone-weights", tmp_path / "backbone.pth", "--out", tmp_path / "out")
    digest = hashlib.sha256((tmp_path / "backbone.pth").read_bytes()).hexdigest()[:12]
    assert summary["backbone"] == f"backbone weights: backbone.pth (sha256 {digest})"
    slots = np.load(tmp_path / "out" / "x.slots.npy")
    direct = segment(full, picture(20, 30, 0)[None], seed=[derive_seed(0, 0)])
    np.testing.assert_allclose(slots, direct.slots[0].numpy(), rtol=1e-4, atol=1e-5)

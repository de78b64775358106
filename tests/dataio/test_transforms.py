"""Per-sample transforms (docs/official.md §5.1) and the pad-to-max collate (docs/official.md §5.2), against hand-computed values."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from smoothsa.dataio.datasets import MOVi
from smoothsa.dataio.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropWindow,
    center_crop_window,
    derive_seed,
    draw_params,
    normalize,
    pad_collate,
    preprocess,
    random_crop_window,
    random_flip,
    resize_image,
    resize_segment,
    strided_clip_start,
)


def test_random_crop_window_follows_torchvision_draws():
    """Replays the torch RNG by hand: area uniform in scale * min^2/(HW), log-uniform ratio, then top/left."""
    g = torch.Generator().manual_seed(0)
    window = random_crop_window(240, 320, generator=g)
    h = torch.Generator().manual_seed(0)
    area = 240 * 320 * torch.empty(1).uniform_(0.75 * 0.75, 0.75, generator=h).item()
    log_ratio = torch.log(torch.tensor([3 / 4, 4 / 3]))
    ratio = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=h)).item()
    width, height = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    top = torch.randint(0, 240 - height + 1, (1,), generator=h).item()
    left = torch.randint(0, 320 - width + 1, (1,), generator=h).item()
    assert window == CropWindow(top, left, height, width) == CropWindow(23, 1, 208, 242)
    # both generators consumed the same number of draws
    assert torch.equal(g.get_state(), h.get_state())


@pytest.mark.parametrize("height, width", [(240, 320), (480, 640), (256, 256), (375, 500), (333, 211)])
def test_random_crop_window_ranges(height, width):
    g = torch.Generator().manual_seed(height * width)
    side = min(height, width)
    tops, lefts = set(), set()
    for _ in range(300):
        w = random_crop_window(height, width, generator=g)
        assert 0 <= w.top and w.top + w.height <= height and 0 <= w.left and w.left + w.width <= width
        # rounding of h and w moves the area by at most about one row and one column
        area = w.height * w.width
        assert 0.75 * side**2 - (w.height + w.width) <= area <= side**2 + (w.height + w.width)
        assert 3 / 4 - 0.02 <= w.width / w.height <= 4 / 3 + 0.02
        tops.add(w.top)
        lefts.add(w.left)
    assert len(tops) > 5 or height == side and len(lefts) > 5


def test_random_crop_window_fallback_is_centred():
    # no (area, ratio) of these ranges fits: torchvision's centred fallback with the clamped ratio
    g = torch.Generator().manual_seed(0)
    assert random_crop_window(100, 100, scale=(0.99, 1.0), ratio=(3.0, 3.0), generator=g) == CropWindow(33, 0, 33, 100)
    assert random_crop_window(100, 100, scale=(0.99, 1.0), ratio=(0.25, 0.25), generator=g) == CropWindow(0, 37, 100, 25)


def test_center_crop_window():
    assert center_crop_window(240, 320) == CropWindow(0, 40, 240, 240)
    assert center_crop_window(321, 200) == CropWindow(60, 0, 200, 200)
    assert center_crop_window(256, 256) == CropWindow(0, 0, 256, 256)


def test_random_flip_consumes_python_random_like_official():
    """Official RandomFlip: `if random.random() > p: return`, else `random.choice(dims)`."""
    ours, theirs = random.Random(5), random.Random(5)
    flips = []
    for _ in range(200):
        flip = random_flip(0.5, ours)
        flipped = not theirs.random() > 0.5
        if flipped:
            theirs.choice([-1])
        assert flip == flipped
        flips.append(flip)
    assert ours.getstate() == theirs.getstate()
    assert 70 < sum(flips) < 130


def test_draw_params_validation_is_deterministic():
    assert draw_params(240, 320, False) == (CropWindow(0, 40, 240, 240), False)


def test_resize_image_antialias_by_hand():
    # a 4-pixel ramp halved: triangle filter of support 2, weights (.75, .75, .25) / 1.75 at the border
    # and (.25, .75, .75) / 1.75 inside -> 7.14 and 22.86, rounded to 7 and 23
    ramp = torch.tensor([0, 10, 20, 30], dtype=torch.uint8).repeat(3, 4, 1)  # (3, 4, 4)
    out = resize_image(ramp, 2)
    assert out.dtype == torch.uint8 and out.shape == (3, 2, 2)
    assert out[0].tolist() == [[7, 23], [7, 23]]


def test_resize_image_rounds_float_result():
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 240, 320), dtype=torch.uint8, generator=g)
    expected = F.interpolate(image[None].double(), size=(256, 256), mode="bilinear", antialias=True)[0]
    out = resize_image(image, 256)
    assert out.dtype == torch.uint8
    # float32 vs float64 accumulation may flip a rounding at .5; never more than one level
    assert (out.double() - expected).abs().max() <= 0.5 + 1e-3
    video = torch.stack([image, image.flip(-1)])  # (T, 3, H, W): frames resized independently
    assert torch.equal(resize_image(video, 256), torch.stack([out, resize_image(image.flip(-1), 256)]))
    assert resize_image(out, 256) is out  # already the right size


def test_resize_segment_nearest_exact_by_hand():
    segment = torch.arange(16, dtype=torch.uint8).reshape(4, 4)
    # nearest-exact picks source index floor((i + 0.5) * in / out): 1 and 3 when halving
    assert resize_segment(segment, 2).tolist() == [[5, 7], [13, 15]]
    # doubling: 0, 0, 1, 1
    assert resize_segment(segment[:2, :2], 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [4, 4, 5, 5], [4, 4, 5, 5]]
    clip = torch.stack([segment, segment + 16])
    assert resize_segment(clip, 2).tolist() == [[[5, 7], [13, 15]], [[21, 23], [29, 31]]]


def test_normalize_by_hand():
    image = torch.zeros(3, 1, 2, dtype=torch.uint8)
    image[:, 0, 0] = torch.tensor([124, 116, 104], dtype=torch.uint8)
    image[:, 0, 1] = 255
    out = normalize(image)
    assert out.dtype == torch.float32
    for c in range(3):
        assert out[c, 0, 0].item() == pytest.approx((image[c, 0, 0].item() - IMAGENET_MEAN[c]) / IMAGENET_STD[c], abs=1e-6)
        assert out[c, 0, 1].item() == pytest.approx((255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], abs=1e-6)


def test_preprocess_with_explicit_window_and_flip():
    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=g)
    segment = torch.randint(0, 5, (60, 80), dtype=torch.uint8, generator=g)
    window = CropWindow(5, 7, 40, 50)
    out, seg = preprocess(image, segment, is_training=True, resolution=32, window=window, flip=True)
    crop = image[:, 5:45, 7:57]
    assert torch.equal(out, normalize(resize_image(crop, 32).flip(-1)))
    assert seg.dtype == torch.uint8 and seg.shape == (32, 32)
    # row i, column j of the flipped output reads source (5 + floor((i+.5)*40/32), 7 + floor((31-j+.5)*50/32))
    for i, j in [(0, 0), (31, 31), (13, 2), (7, 25)]:
        assert seg[i, j] == segment[5 + math.floor((i + 0.5) * 40 / 32), 7 + math.floor((31 - j + 0.5) * 50 / 32)]


def test_preprocess_validation_and_video():
    g = torch.Generator().manual_seed(4)
    video = torch.randint(0, 256, (3, 3, 40, 64), dtype=torch.uint8, generator=g)
    segment = torch.randint(0, 4, (3, 40, 64), dtype=torch.uint8, generator=g)
    out, seg = preprocess(video, segment, is_training=False, resolution=16)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32 and seg.shape == (3, 16, 16)
    assert torch.equal(out[1], normalize(resize_image(video[1, :, :, 12:52], 16)))
    # training: one window and one flip for all frames of the clip
    out, seg = preprocess(video, segment, True, 16, generator=torch.Generator().manual_seed(0), rng=random.Random(0))
    window, flip = draw_params(40, 64, True, torch.Generator().manual_seed(0), random.Random(0))
    rows, cols = slice(window.top, window.top + window.height), slice(window.left, window.left + window.width)
    for t in range(3):
        expected = resize_segment(segment[t, rows, cols], 16)
        assert torch.equal(seg[t], expected.flip(-1) if flip else expected)


def test_preprocess_rejects_mismatched_segment():
    with pytest.raises(ValueError, match="segment"):
        preprocess(torch.zeros(3, 10, 10, dtype=torch.uint8), torch.zeros(10, 11, dtype=torch.uint8), False)


def test_strided_clip_start():
    rng = random.Random(0)
    assert {strided_clip_start(24, 6, rng) for _ in range(300)} == {0, 6, 12, 18}
    # 26 frames: strides 0..24, the last moved back to 26 - 6
    assert {strided_clip_start(26, 6, rng) for _ in range(300)} == {0, 6, 12, 18, 20}
    assert strided_clip_start(5, 5, rng) == 0 and strided_clip_start(3, 5, rng) == 0
    # the draw is random.randint(0, ceil(len/L) - 1) on the same stream
    ours, theirs = random.Random(9), random.Random(9)
    assert strided_clip_start(37, 5, ours) == min(5 * theirs.randint(0, 7), 32)


def test_derive_seed_distinct():
    seeds = {derive_seed(s, e, w) for s in range(3) for e in range(5) for w in range(4)}
    assert len(seeds) == 60
    assert derive_seed(1, 0) != derive_seed(0, 1)


def test_pad_collate_by_hand():
    a = {
        "image": torch.zeros(3, 4, 4),
        "segment": torch.ones(4, 4, 2, dtype=torch.bool),
        "bbox": torch.tensor([[0.1, 0.2, 0.3, 0.4]]),
        "clazz": torch.tensor([7], dtype=torch.uint8),
    }
    b = {
        "image": torch.ones(3, 4, 4),
        "segment": torch.ones(4, 4, 4, dtype=torch.bool),
        "bbox": torch.full((3, 4), 0.5),
        "clazz": torch.tensor([1, 2, 3], dtype=torch.uint8),
    }
    batch = pad_collate([a, b])
    assert batch["image"].shape == (2, 3, 4, 4)
    assert batch["segment"].shape == (2, 4, 4, 4) and batch["segment"].dtype == torch.bool
    assert batch["segment"][0, ..., :2].all() and not batch["segment"][0, ..., 2:].any() and batch["segment"][1].all()
    assert batch["bbox"].shape == (2, 3, 4)
    assert batch["bbox"][0].tolist() == [pytest.approx([0.1, 0.2, 0.3, 0.4]), [0.0] * 4, [0.0] * 4]  # ClPadToMax1
    assert batch["clazz"].tolist() == [[7, 0, 0], [1, 2, 3]] and batch["clazz"].dtype == torch.uint8


def test_pad_collate_video_objects_and_clip_mismatch():
    def clip(frames, objects, channels):
        return {
            "video": torch.zeros(frames, 3, 4, 4),
            "bbox": torch.zeros(frames, objects, 4),
            "segment": torch.zeros(frames, 4, 4, channels, dtype=torch.bool),
        }

    a, b = clip(2, 1, 2), clip(2, 2, 3)
    a["bbox"] += 0.5
    batch = pad_collate([a, b], MOVi.pad_rules)  # the official MOVi ClPadTo1 pads boxes with -1
    assert batch["bbox"].shape == (2, 2, 2, 4) and (batch["bbox"][0, :, 1] == -1).all()
    assert (batch["bbox"][0, :, 0] == 0.5).all()
    assert (pad_collate([a, b])["bbox"][0, :, 1] == 0).all()
    assert batch["segment"].shape == (2, 2, 4, 4, 3)
    with pytest.raises(ValueError, match="batch_size=1"):
        pad_collate([a, clip(3, 1, 2)])

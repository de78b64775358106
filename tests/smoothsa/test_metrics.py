import math
from fractions import Fraction
from itertools import combinations

import numpy as np
import pytest
import torch

from smoothsa.metrics import (
    MetricAverager,
    ari,
    box_iou,
    contingency,
    match_slots_to_objects,
    mbo,
    miou,
    recognition_metrics,
    segments_from_attention,
)


def one_hot(labels, channels: int) -> torch.Tensor:
    """(B, M) integer labels -> (B, M, channels) bool; label -1 = pixel without any channel."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    out = torch.zeros(*labels.shape, channels, dtype=torch.bool)
    valid = labels >= 0
    out[valid, labels[valid]] = True
    return out


def brute_force_ari(pred_labels: list[int], true_labels: list[int]) -> Fraction:
    """Hubert-Arabie ARI by counting unordered pixel pairs; pixels with gt label -1 are ignored."""
    pixels = [(p, t) for p, t in zip(pred_labels, true_labels) if t >= 0]
    both = same_true = same_pred = total = 0
    for (p1, t1), (p2, t2) in combinations(pixels, 2):
        total += 1
        same_true += t1 == t2
        same_pred += p1 == p2
        both += (t1 == t2) and (p1 == p2)
    expected = Fraction(same_true * same_pred, max(total, 1))
    maximum = Fraction(same_true + same_pred, 2)
    if maximum == expected:
        return Fraction(1)
    return (both - expected) / (maximum - expected)


def official_ari(counts: torch.Tensor) -> torch.Tensor:
    """The official ``ARI.adjusted_rand_index`` after its einsum, verbatim (int64 tensors, default dtype)."""
    N = counts
    A = N.sum(1)
    B = N.sum(2)
    num = A.sum(1)
    ridx = (N * (N - 1)).sum([1, 2])
    aidx = (A * (A - 1)).sum(1)
    bidx = (B * (B - 1)).sum(1)
    expect_ridx = (aidx * bidx) / (num * (num - 1)).clip(1)
    max_ridx = (aidx + bidx) / 2
    denominat = max_ridx - expect_ridx
    ari = (ridx - expect_ridx) / denominat
    ari[denominat == 0] = 1
    return ari


def exact_ari_from_counts(counts: np.ndarray) -> Fraction:
    """SAVi formula on one (C, D) int64 contingency, in Python integers and fractions."""
    cells = [int(x) for x in counts.flatten()]
    true_sizes = [int(x) for x in counts.sum(0)]
    pred_sizes = [int(x) for x in counts.sum(1)]
    n = sum(true_sizes)
    rand_index = sum(x * (x - 1) for x in cells)
    a = sum(x * (x - 1) for x in true_sizes)
    bp = sum(x * (x - 1) for x in pred_sizes)
    expected = Fraction(a * bp, max(n * (n - 1), 1))
    maximum = Fraction(a + bp, 2)
    return Fraction(1) if maximum == expected else (rand_index - expected) / (maximum - expected)


# ---------------------------------------------------------------- ARI


def test_ari_hand_computed():
    # gt {0,0,0,1,1,1}, pred {0,0,1,1,2,2}: RI=4, A=12, Bp=6, n(n-1)=30 -> (4-2.4)/(9-2.4) = 8/33.
    pred = one_hot([[0, 0, 1, 1, 2, 2]], 3)
    true = one_hot([[0, 0, 0, 1, 1, 1]], 2)
    assert ari(pred, true).item() == 8 / 33
    # gt {0,0,1,1}, pred {0,0,0,1}: RI=2, A=4, Bp=6, E=2, Max=5 -> 0.
    assert ari(one_hot([[0, 0, 0, 1]], 2), one_hot([[0, 0, 1, 1]], 2)).item() == 0.0


def test_ari_perfect_prediction_is_one_under_relabelling():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (3, 200), generator=g)
    permutation = torch.tensor([3, 0, 4, 1, 2, 5, 6])
    pred = one_hot(permutation[labels], 7)
    true = one_hot(labels, 5)
    for official_compat in (False, True):
        assert ari(pred, true, official_compat=official_compat).tolist() == [1.0, 1.0, 1.0]


def test_ari_all_pixels_in_one_slot_is_zero():
    true = one_hot([[0, 0, 1, 1, 2, 2, 2, 0]], 3)
    pred = one_hot([[0] * 8], 7)  # the other 6 channels empty
    assert ari(pred, true).item() == 0.0
    # ...unless the gt is a single cluster too: Max == E, the convention gives 1.
    assert ari(pred, one_hot([[1] * 8], 3)).item() == 1.0
    # All singletons on both sides: Max == E == 0 -> 1.
    assert ari(one_hot([[0, 1, 2]], 3), one_hot([[2, 0, 1]], 3)).item() == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_ari_matches_brute_force_pair_counting(seed):
    g = torch.Generator().manual_seed(seed)
    pred_labels = torch.randint(0, 4, (2, 23), generator=g)
    true_labels = torch.randint(-1, 3, (2, 23), generator=g)  # -1: unannotated pixel
    pred, true = one_hot(pred_labels, 4), one_hot(true_labels, 3)
    ours = ari(pred, true)
    compat = ari(pred, true, official_compat=True)
    for b in range(2):
        expected = brute_force_ari(pred_labels[b].tolist(), true_labels[b].tolist())
        assert ours[b].item() == float(expected)  # exact, correctly rounded
        assert compat[b].item() == pytest.approx(float(expected), abs=1e-6)  # float32 arithmetic
    # fg: channel 0 is dropped, i.e. its pixels become unannotated.
    ours_fg = ari(pred, true, fg=True)
    for b in range(2):
        fg_labels = [t - 1 if t >= 1 else -1 for t in true_labels[b].tolist()]
        assert ours_fg[b].item() == float(brute_force_ari(pred_labels[b].tolist(), fg_labels))


def test_ari_fg_hand_computed():
    # Background (0) ignored: objects {1,1,2,2} predicted as {0,0,0,1} -> ARI 0, while the full ARI is not 0.
    pred = one_hot([[5, 5, 0, 0, 0, 1]], 6)
    true = one_hot([[0, 0, 1, 1, 2, 2]], 3)
    assert ari(pred, true, fg=True).item() == float(brute_force_ari([0, 0, 0, 1], [0, 0, 1, 1])) == 0.0
    assert ari(pred, true).item() != 0.0


def test_ari_empty_ground_truth_is_nan():
    pred = one_hot([[0, 1, 1], [0, 0, 1]], 2)
    true = one_hot([[-1, -1, -1], [0, 1, 1]], 2)
    for official_compat in (False, True):
        scores = ari(pred, true, official_compat=official_compat)
        assert scores.dtype == torch.float64
        assert math.isnan(scores[0].item()) and not math.isnan(scores[1].item())
    # Only background annotated: ARI-fg has no valid pixel.
    only_background = one_hot([[0, 0, 0]], 2)
    assert math.isnan(ari(pred[:1], only_background, fg=True).item())
    assert ari(pred[:1], only_background).item() == 0.0


def _video_labels(frames: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic whole-video labelling: 60 % background, 10 objects; pred = gt with 30 % of pixels moved."""
    g = torch.Generator().manual_seed(seed)
    pixels = frames * 256 * 256
    true = torch.randint(1, 11, (1, pixels), generator=g)
    true[torch.rand(1, pixels, generator=g) < 0.6] = 0
    pred = true.clone()
    noisy = torch.rand(1, pixels, generator=g) < 0.3
    pred[noisy] = torch.randint(0, 11, (int(noisy.sum()),), generator=g)
    return pred, true


@pytest.mark.slow
def test_ari_whole_video_does_not_overflow():
    pred_labels, true_labels = _video_labels(frames=24, seed=0)
    pred, true = one_hot(pred_labels, 11), one_hot(true_labels, 11)
    # Independent exact reference: bincount contingency (int64) and Python fractions.
    counts = np.bincount(pred_labels[0].numpy() * 11 + true_labels[0].numpy(), minlength=121).reshape(11, 11)
    np.testing.assert_array_equal(contingency(pred, true)[0].numpy(), counts)
    a = sum(int(x) * (int(x) - 1) for x in counts.sum(0))
    bp = sum(int(x) * (int(x) - 1) for x in counts.sum(1))
    assert a * bp > 2**63  # the official int64 product wraps here
    exact = exact_ari_from_counts(counts)
    assert ari(pred, true).item() == float(exact)
    compat = ari(pred, true, official_compat=True)
    assert compat.item() == official_ari(torch.from_numpy(counts)[None]).double().item()
    assert abs(compat.item() - float(exact)) > 0.01
    # ARI-fg: reference on the contingency without the background column.
    exact_fg = exact_ari_from_counts(counts[:, 1:])
    assert ari(pred, true, fg=True).item() == float(exact_fg)
    assert abs(ari(pred, true, fg=True, official_compat=True).item() - float(exact_fg)) > 0.01


def test_ari_official_compat_is_the_official_code():
    g = torch.Generator().manual_seed(1)
    pred, true = one_hot(torch.randint(0, 7, (4, 4096), generator=g), 7), one_hot(
        torch.randint(-1, 5, (4, 4096), generator=g), 5
    )
    counts = torch.einsum("bnc,bnd->bcd", pred.double(), true.double()).long()  # the official contingency
    torch.testing.assert_close(contingency(pred, true), counts, rtol=0, atol=0)
    expected = official_ari(counts).double()
    torch.testing.assert_close(ari(pred, true, official_compat=True), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- mBO / mIoU


def test_mbo_miou_hand_computed():
    # pred {0,0,1,1}, gt {0,0,0,1}: IoU p0g0=2/3, p1g0=1/4, p0g1=0, p1g1=1/2.
    pred, true = one_hot([[0, 0, 1, 1]], 2), one_hot([[0, 0, 0, 1]], 2)
    assert mbo(pred, true).item() == pytest.approx((2 / 3 + 1 / 2) / 2, rel=1e-15)
    assert miou(pred, true).item() == pytest.approx((2 / 3 + 1 / 2) / 2, rel=1e-15)
    # All pixels in one slot: each gt's best IoU is 1/2, but only one gt can be assigned to slot 0.
    pred, true = one_hot([[0, 0, 0, 0]], 2), one_hot([[0, 0, 1, 1]], 2)
    assert mbo(pred, true).item() == 0.5
    assert miou(pred, true).item() == 0.25


def test_mbo_miou_hungarian_differs_from_best_overlap():
    # Slot 0 covers gt 0 and most of gt 1; slot 1 only a sliver of gt 1.
    pred = one_hot([[0, 0, 0, 0, 0, 1]], 2)
    true = one_hot([[0, 0, 1, 1, 1, 1]], 2)
    # IoU p0g0 = 2/5, p0g1 = 3/6, p1g0 = 0, p1g1 = 1/4; best: (2/5 + 1/2)/2; Hungarian: p0g0 + p1g1 = 0.65 > 0.5.
    assert mbo(pred, true).item() == pytest.approx((0.4 + 0.5) / 2, rel=1e-15)
    assert miou(pred, true).item() == pytest.approx((0.4 + 0.25) / 2, rel=1e-15)


def test_mbo_miou_perfect_padded_and_fg():
    labels = torch.tensor([[0, 0, 1, 2, 2, 2, 0, 1]])
    true = one_hot(labels, 5)  # channels 3, 4 are padding: empty, not counted
    pred = one_hot(torch.tensor([2, 0, 1])[labels], 3)
    for metric in (mbo, miou):
        assert metric(pred, true).item() == 1.0
        assert metric(pred, true, fg=True).item() == 1.0
    # fg: drop gt 0 -> only gt 1 and 2 count. pred merges background with gt 1.
    pred = one_hot([[0, 0, 0, 1, 1, 1, 0, 0]], 2)
    # gt1 = {2, 7}: IoU with p0 = 2/5; gt2 = {3,4,5}: IoU with p1 = 1.
    assert mbo(pred, true, fg=True).item() == pytest.approx((0.4 + 1.0) / 2, rel=1e-15)
    # full: gt0 = {0,1,6}: IoU with p0 = 3/5.
    assert mbo(pred, true).item() == pytest.approx((0.6 + 0.4 + 1.0) / 3, rel=1e-15)


def test_mbo_miou_empty_ground_truth_is_nan():
    pred = one_hot([[0, 1], [0, 1]], 2)
    true = one_hot([[-1, -1], [0, 0]], 2)  # sample 1: IoU 1/2 with either slot
    for metric in (mbo, miou):
        scores = metric(pred, true)
        assert scores.dtype == torch.float64 and math.isnan(scores[0].item()) and scores[1].item() == 0.5
        assert math.isnan(metric(pred, true, fg=True)[1].item())


# ---------------------------------------------------------------- segments


def test_segments_bilinear_argmax_and_first_maximum():
    # Slot 0 = [1, 0] along x, slot 1 = 0.6 constant; 2 -> 3 columns. Bilinear (align_corners False) puts the
    # middle column at 0.5 for slot 0, so slot 1 wins there (nearest upsampling would give slot 0).
    attn = torch.zeros(1, 3, 1, 2)
    attn[0, 0, 0] = torch.tensor([1.0, 0.0])
    attn[0, 1, 0] = 0.6
    segments = segments_from_attention(attn, size=(1, 3))
    assert segments.shape == (1, 1, 3, 3) and segments.dtype == torch.bool
    assert segments[0, 0].int().argmax(-1).tolist() == [0, 1, 1]
    # Ties: the first maximum wins.
    tie = segments_from_attention(torch.full((1, 4, 2, 2), 0.25), size=(4, 4))
    assert tie[..., 0].all() and not tie[..., 1:].any()


def test_segments_channel_count_fixed_vs_official():
    attn = torch.rand(2, 3, 6, 4, 4, generator=torch.Generator().manual_seed(0))
    attn[:, :, 4:] = -1.0  # slots 4 and 5 never win
    segments = segments_from_attention(attn, size=(8, 8))
    assert segments.shape == (2, 3, 8, 8, 6)
    assert (segments.sum(-1) == 1).all() and not segments[..., 4:].any()
    official = segments_from_attention(attn, size=(8, 8), official_compat=True)
    assert official.shape == (2, 3, 8, 8, 4)  # largest index present + 1
    assert torch.equal(official, segments[..., :4])


# ---------------------------------------------------------------- recognition


def _five_objects() -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-image batch where image 0 has 5 objects predicted perfectly (slot k+1 = object k), image 1 has 3."""
    labels = torch.zeros(2, 12, 12, dtype=torch.long)
    for k in range(5):
        labels[0, 2 * k : 2 * k + 2, : 6 + k] = k + 1
    for k in range(3):
        labels[1, 3 * k : 3 * k + 3, 2:9] = k + 1
    gt = one_hot(labels.flatten(1), 6).unflatten(1, (12, 12))  # (B, H, W, 1 + 5 objects, padded in image 1)
    pred = one_hot(labels.flatten(1), 7).unflatten(1, (12, 12))  # (B, H, W, S=7), slot 6 empty
    return pred, gt


def test_match_perfect_five_objects_official_filter():
    pred, gt = _five_objects()
    matches = match_slots_to_objects(pred, gt)
    assert matches.batch.tolist() == [0] * 5 + [1] * 3
    assert matches.slot.tolist() == [1, 2, 3, 4, 5, 1, 2, 3]
    assert matches.obj.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]  # padded objects 3, 4 of image 1 dropped
    official = match_slots_to_objects(pred, gt, official_compat=True)
    assert official.batch.tolist() == [0, 0, 1, 1]
    assert official.obj.tolist() == [0, 1, 0, 1]
    assert official.slot.tolist() == [1, 2, 1, 2]
    # The indices gather slots, classes and boxes.
    slots = torch.randn(2, 7, 16)
    assert slots[matches.batch, matches.slot].shape == (8, 16)


def test_match_threshold_and_no_objects():
    # Object 0 (gt channel 1) = pixels 0..9. Slot 1 = pixels 9..18: IoU 1/19; slot 0 = the other 20: IoU 9/21.
    gt_labels = torch.tensor([[1] * 10 + [0] * 20])
    pred_labels = torch.tensor([[0] * 9 + [1] * 10 + [0] * 11])
    gt, pred = one_hot(gt_labels, 2), one_hot(pred_labels, 2)
    matches = match_slots_to_objects(pred, gt, thresh_iou=0.1)
    assert matches.slot.tolist() == [0] and matches.obj.tolist() == [0]  # the Hungarian choice
    assert len(match_slots_to_objects(pred, gt, thresh_iou=9 / 21).batch) == 0  # strictly above
    assert len(match_slots_to_objects(pred[:, :, 1:], gt, thresh_iou=0.1).batch) == 0  # 1/19 < 0.1
    background_only = one_hot(torch.zeros(1, 30, dtype=torch.long), 1)
    empty = match_slots_to_objects(pred, background_only)
    assert empty.batch.shape == (0,) and empty.batch.dtype == torch.int64


def test_box_iou_and_recognition_metrics():
    boxes_pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    boxes_true = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    iou = box_iou(boxes_pred, boxes_true)
    assert iou[0].item() == pytest.approx(1 / 7) and iou[1].item() == 0.0 and math.isnan(iou[2].item())
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.1, 0.2, 0.3], [0.0, 1.0, 2.0, 3.0]])
    target = torch.tensor([1, 3, 0], dtype=torch.uint8)
    metrics = recognition_metrics(logits, target, boxes_pred, boxes_true)
    assert metrics["top1"].tolist() == [1.0, 0.0, 0.0]
    assert metrics["top3"].tolist() == [1.0, 1.0, 0.0]  # class 3 is 2nd for object 1; class 0 last for object 2
    assert metrics["num"] == 3
    torch.testing.assert_close(metrics["iou"], iou, equal_nan=True)


def test_metric_averager_skips_nan_and_sums_counts():
    averager = MetricAverager()
    averager.update({"ari": torch.tensor([0.5, math.nan, 1.0], dtype=torch.float64), "num": 3})
    averager.update({"ari": torch.tensor([0.0]), "num": 2, "empty": torch.tensor([math.nan])})
    result = averager.compute()
    assert result["ari"] == pytest.approx(0.5)
    assert result["num"] == 5
    assert math.isnan(result["empty"])
    averager.reset()
    assert averager.compute() == {}

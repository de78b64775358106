"""Evaluation metrics (docs/official.md §7): predicted segments, ARI / mBO / mIoU, recognition matching and scores.

Segment maps are boolean one-hot tensors flattened to (B, M, channels): M pixels per sample, and for
video the whole clip is one sample (M = T·H·W). Per-sample metrics return float64 (B,) with NaN for
samples whose ground truth is empty; ``MetricAverager`` then averages the valid samples of a split.

``official_compat=True`` switches reproduce known bugs of the official code (docs/official.md §10.1, §10.2, §10.13)
so that published numbers can be reproduced; the defaults compute the intended quantities.
"""

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

# float64 chunks of at most this many elements (128 MiB) bound the memory of the contingency product.
_CHUNK_ELEMENTS = 2**24
# Largest n with n·(n-1) < 2**63: every pair sum below is at most n·(n-1), so int64 holds it exactly.
_MAX_PIXELS = 3_037_000_499


def _check_maps(pred: torch.Tensor, true: torch.Tensor) -> None:
    if pred.ndim != 3 or true.ndim != 3 or pred.shape[:2] != true.shape[:2]:
        raise ValueError(f"expected pred (B,M,C) and true (B,M,D), got {tuple(pred.shape)} and {tuple(true.shape)}")


def contingency(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Exact pixel counts of every (predicted, ground-truth) channel pair.

    Args:
        pred: predicted one-hot map.
        true: ground-truth one-hot map.

    Shapes:
        pred: (B, M, C); true: (B, M, D); returns (B, C, D) int64.
    """
    _check_maps(pred, true)
    batch, pixels, channels = pred.shape
    chunk = max(1, _CHUNK_ELEMENTS // (batch * (channels + true.shape[2])))
    counts = torch.zeros(batch, channels, true.shape[2], dtype=torch.int64, device=pred.device)
    for begin in range(0, pixels, chunk):
        # A chunk's counts are integers <= chunk < 2**53, hence exact in float64 (a float matmul also runs on
        # every device, unlike an int64 one); summing the chunks in int64 keeps any M exact.
        p = pred[:, begin : begin + chunk].double()  # (B, chunk, C)
        t = true[:, begin : begin + chunk].double()  # (B, chunk, D)
        counts += torch.einsum("bmc,bmd->bcd", p, t).long()
    return counts


def _drop_background(true: torch.Tensor, fg: bool) -> torch.Tensor:
    return true[:, :, 1:] if fg else true


def _pair_sums(counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """n, RI = Σ n_cd(n_cd-1), A = Σ a_d(a_d-1) over gt sizes, Bp = Σ b_c(b_c-1) over predicted sizes."""
    true_sizes = counts.sum(1)  # (B, D)
    pred_sizes = counts.sum(2)  # (B, C)
    pixels = true_sizes.sum(1)  # (B,)
    rand_index = (counts * (counts - 1)).sum((1, 2))
    true_pairs = (true_sizes * (true_sizes - 1)).sum(1)
    pred_pairs = (pred_sizes * (pred_sizes - 1)).sum(1)
    return pixels, rand_index, true_pairs, pred_pairs


def _ari_exact(counts: torch.Tensor) -> torch.Tensor:
    # The product A·Bp reaches n**4 ~ 1e32 on whole videos: int64 wraps and float64 rounds it, so the final
    # combination runs on Python integers (unbounded). With the common factor 2·n(n-1) cleared,
    # ARI = 2(RI·P - A·Bp) / ((A + Bp)·P - 2·A·Bp), P = max(n(n-1), 1), and int / int is correctly rounded:
    # the result is the exact ARI rounded once to float64.
    sums = torch.stack(_pair_sums(counts), 1).tolist()  # host sync: B rows of 4 exact int64 values
    scores = []
    for pixels, rand_index, true_pairs, pred_pairs in sums:
        if pixels > _MAX_PIXELS:
            raise ValueError(f"{pixels} labelled pixels overflow the int64 pair counts (limit {_MAX_PIXELS})")
        if pixels == 0:
            scores.append(math.nan)
            continue
        pairs = max(pixels * (pixels - 1), 1)
        numerator = 2 * (rand_index * pairs - true_pairs * pred_pairs)
        denominator = (true_pairs + pred_pairs) * pairs - 2 * true_pairs * pred_pairs
        # Max == E: both labellings are one cluster, or all clusters are singletons; the convention is 1.
        scores.append(1.0 if denominator == 0 else numerator / denominator)
    return torch.tensor(scores, dtype=torch.float64, device=counts.device)


def _ari_official(counts: torch.Tensor) -> torch.Tensor:
    # Bug for bug (docs/official.md §10.1): A·Bp is an int64 product that wraps silently, and torch's true division of
    # int64 tensors computes in float32 (the default dtype), as do every later step.
    pixels, rand_index, true_pairs, pred_pairs = _pair_sums(counts)
    expected = (true_pairs * pred_pairs).float() / (pixels * (pixels - 1)).clip(1).float()
    maximum = (true_pairs + pred_pairs).float() / 2
    denominator = maximum - expected
    score = (rand_index.float() - expected) / denominator
    score[denominator == 0] = 1
    return score.double().masked_fill(pixels == 0, math.nan)


@torch.no_grad()
def ari(pred: torch.Tensor, true: torch.Tensor, fg: bool = False, official_compat: bool = False) -> torch.Tensor:
    """Adjusted Rand index per sample (SAVi formulation, docs/official.md §7.2).

    Pixels without a ground-truth label (unannotated, or background when ``fg``) drop out on both sides.

    Args:
        pred: predicted one-hot map.
        true: ground-truth one-hot map.
        fg: drop ground-truth channel 0 (ARI-fg).
        official_compat: reproduce the official int64 overflow and float32 arithmetic.

    Shapes:
        pred: (B, M, C); true: (B, M, D); returns (B,) float64, NaN where the ground truth is empty.
    """
    counts = contingency(pred, _drop_background(true, fg))
    return _ari_official(counts) if official_compat else _ari_exact(counts)


def _iou_matrix(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """IoU of every (predicted, gt) channel pair, 0 where both are empty; (B, C, D) float64."""
    intersection = contingency(pred, true).double()
    pred_area = pred.sum(1)  # (B, C)
    true_area = true.sum(1)  # (B, D)
    union = pred_area[:, :, None] + true_area[:, None, :] - intersection  # (B, C, D)
    return torch.where(union > 0, intersection / union.clamp(min=1), 0.0)


def _per_gt_mean(matched_iou: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    # Padded (empty) gt channels score 0 and are not counted; no gt at all makes the sample invalid.
    num_true = true.any(1).sum(1)  # (B,)
    return torch.where(num_true > 0, matched_iou.sum(1) / num_true.clamp(min=1), math.nan)


@torch.no_grad()
def mbo(pred: torch.Tensor, true: torch.Tensor, fg: bool = False) -> torch.Tensor:
    """Mean best overlap: every gt channel takes its best IoU over predicted channels (background included).

    Args:
        pred: predicted one-hot map.
        true: ground-truth one-hot map.
        fg: drop ground-truth channel 0.

    Shapes:
        pred: (B, M, C); true: (B, M, D); returns (B,) float64, NaN where the ground truth is empty.
    """
    true = _drop_background(true, fg)
    _check_maps(pred, true)
    best = _iou_matrix(pred, true).max(1).values  # (B, D)
    return _per_gt_mean(best, true)


@torch.no_grad()
def miou(pred: torch.Tensor, true: torch.Tensor, fg: bool = False) -> torch.Tensor:
    """Mean IoU under a one-to-one Hungarian assignment maximising IoU; unmatched gt channels score 0.

    Args:
        pred: predicted one-hot map.
        true: ground-truth one-hot map.
        fg: drop ground-truth channel 0.

    Shapes:
        pred: (B, M, C); true: (B, M, D); returns (B,) float64, NaN where the ground truth is empty.
    """
    true = _drop_background(true, fg)
    _check_maps(pred, true)
    iou = _iou_matrix(pred, true)
    iou_np = iou.cpu().numpy()  # host sync: scipy's Hungarian solver runs on the CPU
    matched = torch.zeros(iou.shape[0], iou.shape[2], dtype=torch.float64)  # (B, D)
    for b, matrix in enumerate(iou_np):
        rows, cols = linear_sum_assignment(matrix, maximize=True)
        matched[b, cols] = torch.from_numpy(matrix[rows, cols])
    return _per_gt_mean(matched.to(iou.device), true)


@torch.no_grad()
def segments_from_attention(
    attn: torch.Tensor, size: tuple[int, int] = (256, 256), official_compat: bool = False
) -> torch.Tensor:
    """Predicted segmentation from slot attention maps (docs/official.md §7.1).

    Bilinear upsampling (align_corners False, no antialias), argmax over slots (the first maximum wins),
    one-hot. The channel count is S; the official code omits ``num_classes``, so its channel count is the
    largest slot index present anywhere in the batch + 1 (``official_compat=True``, docs/official.md §10.13).

    Args:
        attn: attention of each slot over the feature grid (decoder attention for discovery metrics,
            SA attention for recognition matching).
        size: output resolution (H, W).
        official_compat: batch-dependent channel count as in the official code.

    Shapes:
        attn: (B, [T,] S, h, w); returns bool (B, [T,] H, W, S) (S' <= S channels with official_compat).
    """
    if attn.ndim < 4:
        raise ValueError(f"expected attention (B, [T,] S, h, w), got {tuple(attn.shape)}")
    leading, num_slots = attn.shape[:-3], attn.shape[-3]
    maps = attn.flatten(0, -4)  # (B·[T], S, h, w)
    maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False, antialias=False)
    index = maps.argmax(1)  # (B·[T], H, W)
    one_hot = F.one_hot(index, -1 if official_compat else num_slots).bool()  # (B·[T], H, W, S)
    return one_hot.unflatten(0, leading)


class SlotMatches(NamedTuple):
    """Matched (image, slot, object) triples, ready for gathering.

    ``slots[m.batch, m.slot]``, ``classes[m.batch, m.obj]``, ``boxes[m.batch, m.obj]``; each field (K,) int64.
    """

    batch: torch.Tensor
    slot: torch.Tensor
    obj: torch.Tensor


@torch.no_grad()
def match_slots_to_objects(
    pred_seg: torch.Tensor, gt_seg: torch.Tensor, thresh_iou: float = 0.1, official_compat: bool = False
) -> SlotMatches:
    """Hungarian matching of predicted segments to gt objects for the recognition probe (docs/official.md §2.11 step 2).

    Objects are the gt channels after the background channel 0, so ``obj`` indexes the per-object class and
    box tensors. A match is kept if its IoU > ``thresh_iou`` (this also drops padded, empty objects). With
    ``official_compat`` the official membership filter is applied as well: it tests the object index against
    the *values* of the boolean gt mask, {0, 1}, so at most objects 0 and 1 of each image survive (§10.2).

    Args:
        pred_seg: predicted one-hot segments, e.g. from ``segments_from_attention`` (video: frames folded
            into the batch, one matching per frame).
        gt_seg: ground-truth one-hot segments, background first.
        thresh_iou: keep matches with IoU strictly above this.
        official_compat: apply the buggy ≤2-objects filter and match on float32 IoU like the official code.

    Shapes:
        pred_seg: (B, ..., S'); gt_seg: (B, ..., R+1) with the same middle dims; returns K matches.
    """
    pred = pred_seg.flatten(1, -2)  # (B, M, S')
    true = gt_seg.flatten(1, -2)  # (B, M, R+1)
    iou = _iou_matrix(pred, true[:, :, 1:])  # (B, S', R)
    if official_compat:
        iou = iou.float()
        # The values the mask holds, the official membership test's set: 0 if any pixel is False, 1 if any is True.
        holds = torch.stack([~true.flatten(1).all(1), true.flatten(1).any(1)], 1).cpu().numpy()  # (B, 2)
    iou_np = iou.cpu().numpy()  # host sync: scipy's Hungarian solver runs on the CPU
    batch, slot, obj = [], [], []
    for b, matrix in enumerate(iou_np):
        rows, cols = linear_sum_assignment(matrix, maximize=True)
        keep = matrix[rows, cols] > thresh_iou
        if official_compat:
            keep &= np.isin(cols, np.flatnonzero(holds[b]))
        batch += [b] * int(keep.sum())
        slot += rows[keep].tolist()
        obj += cols[keep].tolist()
    matches = torch.tensor([batch, slot, obj], dtype=torch.int64).reshape(3, -1)  # one copy to the device
    return SlotMatches(*matches.to(pred_seg.device))


@torch.no_grad()
def box_iou(box_pred: torch.Tensor, box_target: torch.Tensor) -> torch.Tensor:
    """IoU of boxes given as (l, t, r, b), computed directly on the 4 numbers like the official ``BoxIoU``.

    Shapes:
        box_pred, box_target: (K, 4); returns (K,) float64, NaN where the union is <= 0 (invalid).
    """
    p, t = box_pred.double(), box_target.double()
    width = (torch.minimum(p[:, 2], t[:, 2]) - torch.maximum(p[:, 0], t[:, 0])).clamp(min=0)
    height = (torch.minimum(p[:, 3], t[:, 3]) - torch.maximum(p[:, 1], t[:, 1])).clamp(min=0)
    intersection = width * height
    area_pred = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    area_target = (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])
    union = area_pred + area_target - intersection
    return torch.where(union > 0, intersection / union, math.nan)


@torch.no_grad()
def recognition_metrics(
    class_logits: torch.Tensor,
    class_target: torch.Tensor,
    box_pred: torch.Tensor,
    box_target: torch.Tensor,
) -> dict[str, torch.Tensor | int]:
    """Per-object recognition scores (docs/official.md §7.3), to be averaged over all matched objects of a split.

    Args:
        class_logits: probe class logits of the matched slots.
        class_target: gt class ids.
        box_pred: probe boxes (l, t, r, b).
        box_target: gt boxes (l, t, r, b).

    Shapes:
        class_logits: (K, ncls); class_target: (K,); box_pred, box_target: (K, 4).
        returns: {"top1", "top3": (K,) float64 in {0, 1}; "iou": (K,) float64, NaN if invalid;
        "num": K as an int, summed (not averaged) by ``MetricAverager``}.
    """
    target = class_target.long()
    top1 = (class_logits.argmax(-1) == target).double()
    top = class_logits.topk(min(3, class_logits.shape[-1]), dim=-1).indices  # (K, 3)
    top3 = (top == target[:, None]).any(-1).double()
    return {"top1": top1, "top3": top3, "iou": box_iou(box_pred, box_target), "num": int(class_logits.shape[0])}


class MetricAverager:
    """Averages per-sample metrics over a split, skipping NaN (invalid) samples; sums integer counts.

    Tensors are accumulated on their own device, so ``update`` never waits for the device; ``compute``
    synchronises once.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._totals: dict[str, int] = {}

    def update(self, metrics: Mapping[str, torch.Tensor | int]) -> None:
        """Adds one batch.

        Args:
            metrics: name -> per-sample values (tensor of any shape, NaN = invalid) or an int count.
        """
        for name, value in metrics.items():
            if isinstance(value, int):
                self._totals[name] = self._totals.get(name, 0) + value
                continue
            values = value.detach().double().flatten()
            valid = ~values.isnan()
            total = torch.where(valid, values, 0.0).sum()
            self._sums[name] = self._sums.get(name, 0) + total
            self._counts[name] = self._counts.get(name, 0) + valid.sum()

    def compute(self) -> dict[str, float | int]:
        """Mean over the valid samples seen since ``reset`` (NaN if none), and the summed counts."""
        result: dict[str, float | int] = {}
        for name, total in self._sums.items():
            count = int(self._counts[name])  # host sync, once per metric and split
            result[name] = float(total) / count if count else math.nan
        result.update(self._totals)
        return result

"""Training losses of SmoothSA (docs/official.md §3).

Every function returns the plain mean; the caller multiplies by the preset's weight
(recon 1, preheat 100, SlotContrast 0.5, recognition ce 1 and l1 1) and sums.
"""

import torch
import torch.nn.functional as F


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    # F.mse_loss would broadcast mismatched shapes with only a warning; a wrong target shape is a bug.
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def reconstruction_loss(recon: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the decoder output and the frozen backbone features.

    Args:
        recon: decoder reconstruction.
        feature: raw DINOv2 feature map (the target; never receives a gradient).

    Shapes:
        recon, feature: any equal shapes, e.g. (B, 384, 16, 16) or (B, T, 384, 16, 16).
        returns: () scalar, mean over all elements.
    """
    _check_same_shape(recon, feature, "reconstruction_loss")
    return F.mse_loss(recon, feature.detach())


def preheat_loss(qinit: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Pulls the preheated queries towards the (stop-gradient) slots they converge to.

    Args:
        qinit: initializer output before the stop-gradient.
        slots: slot-attention output; for video pass the frame-0 slots, ``slots[:, 0]``.

    Shapes:
        qinit, slots: (B, S, Ds).
        returns: () scalar, mean over B·S·Ds.
    """
    _check_same_shape(qinit, slots, "preheat_loss")
    return F.mse_loss(qinit, slots.detach())


def slot_contrast_loss(slots: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """SlotContrast: each slot of frame t+1 must pick its own slot of frame t among all slots of the batch.

    The combined index is m = s·B + b (slot-major, as the official ``"b t s c -> t (s b) c"``).
    ``cross_entropy`` treats dim 1 as the class axis, so for every slot m' of frame t+1 the softmax
    runs over all slots m of frame t (every batch element), with target m = m'.

    Args:
        slots: per-frame slots; gradients flow into every frame.
        tau: softmax temperature.

    Shapes:
        slots: (B, T, S, D) with T >= 2.
        returns: () scalar, mean over the (T-1)·S·B terms.
    """
    batch, frames, num_slots, _ = slots.shape
    if frames < 2:
        raise ValueError(f"slot_contrast_loss needs at least 2 frames, got T={frames}")
    slots = F.normalize(slots, p=2.0, dim=-1)
    slots = slots.permute(1, 2, 0, 3).flatten(1, 2)  # (T, S·B, D), m = s·B + b
    similarity = torch.einsum("tmd,tnd->tmn", slots[:-1], slots[1:]) / tau  # (T-1, S·B, S·B)
    # Class indices instead of the official one-hot probability target: same value, no (S·B)² target tensor.
    target = torch.arange(num_slots * batch, device=slots.device).expand(frames - 1, -1)  # (T-1, S·B)
    return F.cross_entropy(similarity, target)


def recognition_losses(
    class_logits: torch.Tensor,
    class_target: torch.Tensor,
    box_pred: torch.Tensor,
    box_target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Class cross-entropy and box L1 of the recognition probe over the matched objects.

    Args:
        class_logits: probe class logits of the matched slots.
        class_target: gt class ids (any integer dtype; uint8 is accepted like the official code).
        box_pred: raw probe box regression.
        box_target: gt boxes (l, t, r, b).

    Shapes:
        class_logits: (K, ncls); class_target: (K,); box_pred, box_target: (K, 4).
        returns: (ce, l1), two () scalars (means over K and K·4), or None when K == 0 —
        the official loss is then flagged invalid and the training step is skipped.
    """
    if class_logits.shape[0] == 0:
        return None
    _check_same_shape(box_pred, box_target, "recognition_losses")
    ce = F.cross_entropy(class_logits, class_target.long())
    l1 = F.l1_loss(box_pred, box_target)
    return ce, l1

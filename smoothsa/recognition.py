"""`ObjDiscovRecogn`: a recognition probe on the slots of a frozen discovery model (docs/official.md §2.11).

Slots are matched to ground-truth objects through their segments (Hungarian matching on IoU); an MLP then
predicts each matched slot's class and box.

Shapes: B batch, T frames, S slots, Ds slot channels, H×W segment resolution, R objects, K matches.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from smoothsa.metrics import SlotMatches, match_slots_to_objects, segments_from_attention
from smoothsa.mlp import mlp
from smoothsa.models import SlotOutput


@dataclass
class RecognitionOutput:
    """discovery: the frozen model's `SlotOutput`; slots (K, Ds) matched slots; class_logits (K, ncls);
    box_pred (K, 4) l, t, r, b; class_target (K,); box_target (K, 4); matches: which (image, slot, object)."""

    discovery: SlotOutput
    slots: torch.Tensor
    class_logits: torch.Tensor
    box_pred: torch.Tensor
    class_target: torch.Tensor
    box_target: torch.Tensor
    matches: SlotMatches


class ObjDiscovRecogn(nn.Module):
    """Frozen discovery model + MLP probe `[Linear(Ds→512), GELU, Dropout(0.1), Linear(512→ncls+4)]`.

    Args:
        discov: a discovery model (`SmoothSA`, `SmoothSAVideo`, `SPOT`); frozen here.
        num_classes: ncls (category ids 0..ncls−1; 0 unused by COCO/YTVIS).
        slot_dim: Ds.
        thresh_iou: a match is kept if its segment IoU is above this.
        attention: which attention gives the predicted segments: "attn_enc" (the official choice) or
            "attn_dec" (the one the discovery metrics use).
        official_compat: keep the official filter that admits at most objects 0 and 1 per image (docs/official.md §10.2),
            needed to reproduce the published recognition numbers; off, every matched object counts. It also gives
            the predicted segments the official channel count (§10.13). `smoothsa.tasks.Recognition` sets it.

    The discovery model runs in the wrapper's mode, as in the official code: during probe training it samples
    its training-time noise and masking.

    Shapes: input as the discovery model; segment (B, [T,] H, W, R+1) one-hot, background first;
    clazz (B, [T,] R); bbox (B, [T,] R, 4) → `RecognitionOutput`.
    """

    def __init__(
        self,
        discov: nn.Module,
        num_classes: int,
        slot_dim: int = 256,
        thresh_iou: float = 0.1,
        attention: str = "attn_enc",
        official_compat: bool = False,
    ):
        super().__init__()
        if attention not in ("attn_enc", "attn_dec"):
            raise ValueError(f"ObjDiscovRecogn: attention must be 'attn_enc' or 'attn_dec', got {attention!r}")
        self.num_classes = num_classes
        self.thresh_iou = thresh_iou
        self.attention = attention
        self.official_compat = official_compat
        self.discov = discov.requires_grad_(False)
        self.recogn = mlp(slot_dim, [512, num_classes + 4], dropout=0.1)

    @property
    def has_backbone(self) -> bool:
        return self.discov.has_backbone

    def forward(
        self,
        input: torch.Tensor,
        condit: torch.Tensor | None = None,
        init_noise: torch.Tensor | None = None,
        segment: torch.Tensor | None = None,
        clazz: torch.Tensor | None = None,
        bbox: torch.Tensor | None = None,
    ) -> RecognitionOutput:
        if segment is None or clazz is None or bbox is None:
            raise ValueError("ObjDiscovRecogn needs segment, clazz and bbox to match slots to objects")
        with torch.inference_mode():
            discovery = self.discov(input, condit, init_noise)
            slots = discovery.slots.flatten(0, -3)  # (B·[T], S, Ds)
            attn = getattr(discovery, self.attention).flatten(0, -4)  # (B·[T], S, h, w)
            gt = segment.flatten(0, -4)  # (B·[T], H, W, R+1)
            if gt.shape[0] != slots.shape[0]:
                raise ValueError(f"ObjDiscovRecogn: segment {tuple(segment.shape)} does not match the input's batch/frames")
            pred = segments_from_attention(attn, tuple(gt.shape[1:3]), self.official_compat)  # (B·[T], H, W, S)
            matches = match_slots_to_objects(pred, gt, self.thresh_iou, self.official_compat)
            matched = slots[matches.batch, matches.slot]  # (K, Ds)
        classes = clazz.flatten(0, -2)[matches.batch, matches.obj].long()  # (K,)
        boxes = bbox.flatten(0, -3)[matches.batch, matches.obj]  # (K, 4)
        matched = matched.clone()  # an ordinary tensor outside inference mode, so the probe can train on it
        out = self.recogn(matched)  # (K, ncls + 4)
        return RecognitionOutput(
            discovery, matched, out[:, : self.num_classes], out[:, self.num_classes :], classes, boxes, matches
        )

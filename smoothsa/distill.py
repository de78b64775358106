"""SPOT's second stage, self-training (docs/official.md §2.9b): the `SPOTDistill` model, its attention-matching
loss, and its initialisation from a trained `spot_r-coco` checkpoint (`smoothsa.tasks.SpotDistill` trains it).

A frozen SPOT teacher groups each image; its decoder attention, matched slot to slot with the student's slot
attention, is the student's target. The student is a SPOT with a learnt mean per slot, bi-level truncation and
DINOv2 blocks 8–11 trained; a frozen copy of its backbone (`encode_backbone2`) makes its reconstruction target.

Shapes: B batch, S slots (S' the teacher's), N = h·w tokens, Ds slot channels.
"""
import dataclasses
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from smoothsa.backbone import DINOv2ViT
from smoothsa.checkpoint import BACKBONE_KEY, PREFIX, BadCheckpoint, official_state_dict, read_checkpoint
from smoothsa.metrics import _iou_matrix
from smoothsa.models import SPOT, SlotOutput

# The student's DINOv2 blocks that train; the official freezing regexes leave exactly these out.
TRAINED_BLOCKS = range(8, 12)


@dataclasses.dataclass
class DistillOutput(SlotOutput):
    """The student's `SlotOutput`, plus teacher_attn_dec: (B, S', h, w) the teacher's decoder attention."""

    teacher_attn_dec: torch.Tensor


class SPOTDistill(nn.Module):
    """A frozen SPOT teacher and the SPOT student it teaches. State_dict keys `teacher.*` then `student.*`.

    Args:
        teacher: the first-stage SPOT; frozen, kept in eval mode by `train()`, run under inference mode.
        student: a SPOT built with `finetune=True`. Blocks 8–11 of its DINOv2 backbone are made trainable here;
            the rest of its backbone and its `encode_backbone2` stay frozen. A backbone without ViT blocks (the
            feature-map input, `PatchFeatures`) stays wholly frozen.

    Shapes: input (B, 3, 256, 256) or (B, 384, 16, 16) → `DistillOutput`: the student's output (discovery metrics
    read its decoder attention) and the teacher's decoder attention. `init_noise` (B, S, Ds) replaces the
    student's training noise, `teacher_noise` (B, S', Ds) the teacher's draw (SPOT's teacher samples in eval too).
    """

    def __init__(self, teacher: SPOT, student: SPOT):
        super().__init__()
        if not getattr(student, "finetune", False):
            raise ValueError("SPOTDistill: the student must be a SPOT built with finetune=True")
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = student
        for module in student.encode_backbone.modules():
            if isinstance(module, DINOv2ViT):
                for i in TRAINED_BLOCKS:
                    module.blocks[i].requires_grad_(True)

    def train(self, mode: bool = True) -> "SPOTDistill":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(
        self,
        input: torch.Tensor,
        condit: torch.Tensor | None = None,
        init_noise: torch.Tensor | None = None,
        teacher_noise: torch.Tensor | None = None,
    ) -> DistillOutput:
        with torch.inference_mode():
            teacher = self.teacher(input, condit, teacher_noise)
        student = self.student(input, condit, init_noise)
        fields = {f.name: getattr(student, f.name) for f in dataclasses.fields(student)}
        # clone: an ordinary tensor outside inference mode, usable next to the student's graph
        return DistillOutput(**fields, teacher_attn_dec=teacher.attn_dec.clone())


def attention_match_loss(attn_student: torch.Tensor, attn_teacher: torch.Tensor) -> torch.Tensor:
    """SPOT's attention-matching loss: the official `AttentMatchLoss` with its crash fixed.

    The official forward ends in a call to a method that does not exist (`self.finaliz`), so the official
    distillation config cannot train (docs/official.md §10.4); this returns the value its body computes.

    Every token belongs to the slot of largest attention, on each side. Student and teacher slots are paired by
    the Hungarian matching that maximises the IoU of these hard segments; a token's target is the student slot
    paired with the teacher slot that owns the token. The loss is the cross-entropy of the student's attention
    *values* (softmax outputs, in [0, 1]) taken as logits, as in the official code, against these targets.

    Args:
        attn_student: the student's slot attention; receives the gradient.
        attn_teacher: the teacher's decoder attention (no gradient).

    Shapes: attn_student (B, S, h, w) or (B, S, N); attn_teacher (B, S', h, w) or (B, S', N) with S' <= S,
    so that every teacher slot has a partner → () mean over the B·N tokens.
    """
    logits = attn_student.flatten(2).float()  # (B, S, N)
    teacher = attn_teacher.flatten(2).detach()  # (B, S', N)
    b, s, n = logits.shape
    s_teacher = teacher.shape[1]
    if teacher.shape[0] != b or teacher.shape[2] != n or s_teacher > s:
        raise ValueError(
            f"attention_match_loss: need student (B, S, N) and teacher (B, S' <= S, N) attention, got "
            f"{tuple(attn_student.shape)} and {tuple(attn_teacher.shape)}"
        )
    with torch.no_grad():
        student_owner = logits.argmax(1)  # (B, N)
        teacher_owner = teacher.argmax(1)  # (B, N)
        iou = _iou_matrix(F.one_hot(student_owner, s).bool(), F.one_hot(teacher_owner, s_teacher).bool())  # (B, S, S')
        partner = torch.empty(b, s_teacher, dtype=torch.int64)  # the student slot of each teacher slot
        for i, matrix in enumerate(iou.cpu().numpy()):  # host sync: scipy's Hungarian solver runs on the CPU
            rows, cols = linear_sum_assignment(matrix, maximize=True)
            partner[i, torch.from_numpy(cols)] = torch.from_numpy(rows)
        # With S = S' (every config) this is the official target; with S > S' the official code would take the
        # position in the list of matched pairs for the student slot, which we do not copy.
        target = partner.to(logits.device).gather(1, teacher_owner)  # (B, N)
    return F.cross_entropy(logits, target)


# Target prefix ← source prefix: keys pair by position within the two prefix-filtered key lists (the official
# `ckpt_map` of the distillation config). The official `encode_backbone2` is a copy of the pretrained DINOv2 taken
# when the model is built; our builds start random and take DINOv2 from checkpoints, so it pairs with the
# checkpoint's backbone, which holds those same pretrained weights (frozen through the first stage).
SPOT_TO_DISTILL = (
    ("m.teacher.", "m."),
    ("m.student.encode_backbone.", "m.encode_backbone."),
    ("m.student.encode_backbone2.", "m.encode_backbone."),
    ("m.student.encode_posit_embed.", "m.encode_posit_embed."),
    ("m.student.encode_project.", "m.encode_project."),
    ("m.student.aggregat.", "m.aggregat."),
    ("m.student.decode.", "m.decode."),
)


def init_distill_from_spot(model: SPOTDistill, state_dict_or_path) -> SPOTDistill:
    """Initialises a `SPOTDistill` from a trained SPOT checkpoint (`spot_r-coco`, official key layout), pairing
    keys by position as `SPOT_TO_DISTILL` lists; the student's initializer (`NormalSeparat`) keeps its fresh
    initialisation. Backbone keys are dropped when the model was built with `backbone=False`.

    Every pair's key count and every paired shape are checked before anything is written; a mismatch raises a
    `BadCheckpoint` (a ValueError) naming the checkpoint and the first mismatch.

    Args:
        model: built by `build_model("spot_r_distill-coco")`.
        state_dict_or_path: a path (loaded with `weights_only=True`) or a state_dict, keys with or without `m.`.
    """
    is_path = isinstance(state_dict_or_path, (str, os.PathLike))
    name = os.fspath(state_dict_or_path) if is_path else "the given state_dict"
    source = read_checkpoint(state_dict_or_path)
    if not any(k.startswith(PREFIX) for k in source):
        source = {PREFIX + k: v for k, v in source.items()}
    target = official_state_dict(model)
    if not any(BACKBONE_KEY.search(k) for k in target):
        source = {k: v for k, v in source.items() if not BACKBONE_KEY.search(k)}
    paired = {}
    for target_prefix, source_prefix in SPOT_TO_DISTILL:
        target_keys = [k for k in target if k.startswith(target_prefix)]
        source_keys = [k for k in source if k.startswith(source_prefix)]
        if len(target_keys) != len(source_keys):
            raise BadCheckpoint(
                f"init_distill_from_spot: {name} is not a checkpoint of the teacher's SPOT: {source_prefix}* has "
                f"{len(source_keys)} keys, {target_prefix}* expects {len(target_keys)}"
            )
        for t, k in zip(target_keys, source_keys):
            if tuple(source[k].shape) != tuple(target[t].shape):
                raise BadCheckpoint(
                    f"init_distill_from_spot: {name} does not fit: {k} {tuple(source[k].shape)} pairs with {t} "
                    f"{tuple(target[t].shape)}"
                )
            paired[t[len(PREFIX) :]] = source[k]
    model.load_state_dict(paired, strict=False)
    return model

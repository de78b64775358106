"""What one batch means to each kind of model: its forward pass, its weighted losses and its metrics.

    task = task_for(preset)
    out = task.forward(model, batch)
    loss = sum(task.losses(out, batch).values())
    scores = task.metrics(out, batch, official_compat=False)   # name -> per-sample values, NaN = invalid

Batch dicts come from `smoothsa.dataio` loaders (`image` or `video`, `segment`, optional `bbox`, `clazz`); an
optional `init_noise` (B, S, Ds) replaces the initializer's N(0, 1) draw (`smoothsa.evaluation` seeds it per
sample). `task_for` is the one place that tells the kinds of model apart.
"""
import dataclasses

import torch
import torch.nn as nn

from smoothsa import losses, metrics
from smoothsa.checkpoint import load_official
from smoothsa.distill import attention_match_loss, init_distill_from_spot
from smoothsa.presets import Preset, get_preset
from smoothsa.recognition import ObjDiscovRecogn


class Task:
    """One kind of model. Subclasses set `train_keys` and implement `forward`, `losses` and `metrics`.

    train_keys: the batch keys a training step reads.
    pixels: the batch key of the model input ("image" or "video").
    initial_weights: the checkpoints a new run starts from (`Trainer.load_initial_weights`, `--<name>-ckpt`).
    counts: result names that report how many entries of a metric were valid (summed over the split, not
        averaged), e.g. recognition's {"num": "top1"}.
    """

    train_keys: tuple[str, ...] = ()
    pixels: str = "image"
    initial_weights: tuple[str, ...] = ()
    counts: dict[str, str] = {}

    def __init__(self, preset: Preset):
        self.preset = preset
        self.weights = dict(preset.optim.loss_weights)

    def forward(self, model: nn.Module, batch: dict):
        raise NotImplementedError

    def losses(self, out, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def metrics(self, out, batch: dict, official_compat: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def valid(self, out) -> torch.Tensor | None:
        """A () bool tensor, False when the batch holds nothing to learn from (the step is then skipped);
        None: always valid."""
        return None

    def set_official_compat(self, model: nn.Module, official_compat: bool) -> None:
        """Switches the model's own official behaviours (none for discovery models)."""

    def load_initial_weights(self, model: nn.Module, name: str, path) -> None:
        """Loads the `name` checkpoint (one of `initial_weights`) into its part of `model`."""
        raise KeyError(f"{type(self).__name__} starts from no {name!r} checkpoint")

    def noise_shape(self, batch: dict) -> tuple[int, int] | None:
        """(S, Ds) of one sample's initializer noise in eval mode; None when the initializer draws none."""
        config = self.preset.model
        slots = batch["bbox"].shape[-2] if config.initializer == "mlp_preheated" else config.num_slots
        return slots, config.slot_dim

    def attention(self, out) -> torch.Tensor:
        """(B, [T,] S, h, w): the attention whose argmax is the predicted segmentation (pictures, metrics)."""
        return out.attn_dec


class ImageDiscovery(Task):
    """SmoothSA on images: reconstruction, plus the preheat loss when the preset weights it."""

    def __init__(self, preset: Preset):
        super().__init__(preset)
        self.boxes = preset.model.initializer == "mlp_preheated"
        self.train_keys = (self.pixels, "bbox") if self.boxes else (self.pixels,)

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixels, condit): the images or videos, and the per-frame boxes of box-conditioned models."""
        if self.boxes and "bbox" not in batch:
            raise KeyError(f"preset {self.preset.name} conditions on boxes, but the batch has no 'bbox' (keys: {sorted(batch)})")
        if not self.boxes:
            return batch[self.pixels], None
        boxes = batch["bbox"]  # (B, [T,] S, 4): S is the batch's padded box count and differs between batches
        if not torch.compiler.is_compiling():  # one compiled graph for every S (marked outside the traced code)
            torch._dynamo.maybe_mark_dynamic(boxes, boxes.dim() - 2)
        return batch[self.pixels], boxes

    def forward(self, model: nn.Module, batch: dict):
        pixels, condit = self.inputs(batch)
        return model(pixels, condit, batch.get("init_noise"))

    def losses(self, out, batch: dict) -> dict[str, torch.Tensor]:
        """Weighted losses (docs/official.md §3); their sum is optimised."""
        terms = {"recon": losses.reconstruction_loss(out.recon, out.feature)}
        if "preheat" in self.weights:
            first = out.slots[:, 0] if out.slots.dim() == 4 else out.slots  # video: frame-0 slots only
            terms["preheat"] = losses.preheat_loss(out.qinit, first)
        if "ssc" in self.weights:
            terms["ssc"] = losses.slot_contrast_loss(out.slots.float())
        return {name: self.weights[name] * value for name, value in terms.items()}

    @torch.no_grad()
    def metrics(self, out, batch: dict, official_compat: bool) -> dict[str, torch.Tensor]:
        """Per-sample ARI, ARI-fg, mBO, mIoU from the decoder attention (docs/official.md §7.1–7.2); a video is
        one sample. Shapes: segment (B, [T,] H, W, C) bool → each metric (B,) float64."""
        segment = batch["segment"]
        size = tuple(segment.shape[-3:-1])
        pred = metrics.segments_from_attention(self.attention(out).float(), size, official_compat)  # (B, [T,] H, W, S)
        b = segment.shape[0]
        pred = pred.reshape(b, -1, pred.shape[-1])  # (B, M, S)
        true = segment.reshape(b, -1, segment.shape[-1])  # (B, M, C)
        return {
            "ari": metrics.ari(pred, true, official_compat=official_compat),
            "ari_fg": metrics.ari(pred, true, fg=True, official_compat=official_compat),
            "mbo": metrics.mbo(pred, true),
            "miou": metrics.miou(pred, true),
        }


class VideoDiscovery(ImageDiscovery):
    """SmoothSAVideo: as the image model on clips, plus the slot-contrast loss; MOVi conditions on boxes."""

    pixels = "video"


class Spot(ImageDiscovery):
    """The SPOT baseline: reconstruction only (its preset weights nothing else)."""


class SpotDistill(Spot):
    """SPOT's second stage (`smoothsa.distill.SPOTDistill`): the student's reconstruction of the frozen copy's
    features plus `attention_match_loss` against the frozen teacher; the metrics are the student's."""

    initial_weights = ("teacher",)

    def __init__(self, preset: Preset):
        super().__init__(preset)
        missing = {"recon", "match"} - set(self.weights)
        if missing:
            raise ValueError(f"{preset.name}: optim.loss_weights lacks {sorted(missing)} (official: recon 1, match 0.005)")
        self.teacher_slots = get_preset(preset.model.discovery).model.num_slots

    def forward(self, model: nn.Module, batch: dict):
        noise = batch.get("init_noise")  # the teacher's eval-mode noise: the first S' rows of the student's
        return model(batch[self.pixels], init_noise=noise,
                     teacher_noise=None if noise is None else noise[:, : self.teacher_slots])

    def losses(self, out, batch: dict) -> dict[str, torch.Tensor]:
        return {"recon": self.weights["recon"] * losses.reconstruction_loss(out.recon, out.feature),
                "match": self.weights["match"] * attention_match_loss(out.attn_enc, out.teacher_attn_dec)}

    def load_initial_weights(self, model: nn.Module, name: str, path) -> None:
        if name == "teacher":
            init_distill_from_spot(model, path)
        else:
            super().load_initial_weights(model, name, path)


class Recognition(Task):
    """A probe on a frozen discovery model: slots matched to objects, class cross-entropy and box L1.

    Metrics are per object: `top1`, `top3`, `iou` of shape (B, [T·]R), NaN where no slot matched the object
    (so the split's mean is over matched objects, docs/official.md §7.3), and `num`, the matched objects.
    """

    counts = {"num": "top1"}
    initial_weights = ("discovery",)

    def __init__(self, preset: Preset, discovery: Task):
        super().__init__(preset)
        self.discovery = discovery
        self.pixels = discovery.pixels
        self.train_keys = (self.pixels, "segment", "clazz", "bbox")

    def forward(self, model: nn.Module, batch: dict):
        pixels, condit = self.discovery.inputs(batch)
        return model(pixels, condit, init_noise=batch.get("init_noise"), segment=batch["segment"],
                     clazz=batch["clazz"], bbox=batch["bbox"])

    def losses(self, out, batch: dict) -> dict[str, torch.Tensor]:
        """ce and l1 over the matched objects; both 0 (and `valid` False) when no slot matched an object."""
        pair = losses.recognition_losses(out.class_logits.float(), out.class_target, out.box_pred.float(), out.box_target)
        if pair is None:
            zero = out.class_logits.sum() * 0 + out.box_pred.sum() * 0  # in the graph: the backward still runs
            pair = zero, zero
        return {"ce": self.weights["ce"] * pair[0], "l1": self.weights["l1"] * pair[1]}

    def valid(self, out) -> torch.Tensor:
        return torch.full((), out.class_logits.shape[0] > 0, device=out.class_logits.device)

    def set_official_compat(self, model: nn.Module, official_compat: bool) -> None:
        for module in model.modules():  # through DDP and torch.compile wrappers
            if isinstance(module, ObjDiscovRecogn):
                module.official_compat = official_compat

    def load_initial_weights(self, model: nn.Module, name: str, path) -> None:
        if name == "discovery":
            load_official(model.discov, path)
        else:
            super().load_initial_weights(model, name, path)

    @torch.no_grad()
    def metrics(self, out, batch: dict, official_compat: bool) -> dict[str, torch.Tensor]:
        """The matching already ran in `forward` with the model's `official_compat` (`set_official_compat`)."""
        scores = metrics.recognition_metrics(out.class_logits.float(), out.class_target, out.box_pred.float(), out.box_target)
        b = batch[self.pixels].shape[0]
        rows = out.discovery.slots.flatten(0, -3).shape[0]  # B·[T]
        objects = batch["clazz"].shape[-1]
        per_object = {}
        for name in ("top1", "top3", "iou"):
            grid = torch.full((rows, objects), float("nan"), dtype=torch.float64, device=out.class_logits.device)
            grid[out.matches.batch, out.matches.obj] = scores[name]
            per_object[name] = grid.reshape(b, -1)  # (B, [T·]R): one row per sample
        return per_object

    def noise_shape(self, batch: dict) -> tuple[int, int] | None:
        return self.discovery.noise_shape(batch)

    def attention(self, out) -> torch.Tensor:
        return out.discovery.attn_dec


def task_for(preset: Preset) -> Task:
    """The task of a preset's model kind."""
    arch = preset.model.arch
    if arch == "recognition":
        discovery = dataclasses.replace(preset, model=dataclasses.replace(
            preset.model, arch=get_preset(preset.model.discovery).model.arch, discovery=None, num_classes=None))
        return Recognition(preset, task_for(discovery))
    kinds = {"smoothsa": ImageDiscovery, "smoothsa_video": VideoDiscovery, "spot": Spot, "spot_distill": SpotDistill}
    if arch not in kinds:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(sorted(kinds))}, recognition")
    return kinds[arch](preset)

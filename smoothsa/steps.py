"""What one batch means to each architecture: the forward pass, the weighted losses and the metrics.

Batch dicts come from `smoothsa.dataio` loaders (`image` or `video`, `segment`, optional `bbox`, `clazz`).
"""
import torch
import torch.nn as nn

from smoothsa import losses, metrics
from smoothsa.presets import Preset


def model_inputs(batch: dict, preset: Preset) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pixels, condit): the image or video, and the per-frame boxes (B, T, S, 4) for box-conditioned video models.

    Their slot count S is the batch's padded box count and differs from batch to batch: the S axis of `condit` is
    marked dynamic, so a compiled model traces one graph for every S instead of one per S. (Marked here, outside
    the traced code, when the model is what is compiled.)
    """
    pixels = batch["video"] if "video" in batch else batch["image"]
    condit = None
    if preset.model.initializer == "mlp_preheated":
        if "bbox" not in batch:
            raise KeyError(f"preset {preset.name} conditions on boxes, but the batch has no 'bbox' (keys: {sorted(batch)})")
        condit = batch["bbox"]
        if not torch.compiler.is_compiling():
            torch._dynamo.maybe_mark_dynamic(condit, 2)
    return pixels, condit


def discovery_losses(out, preset: Preset) -> dict[str, torch.Tensor]:
    """Weighted losses of a discovery model (docs/official.md §3); their sum is optimised."""
    weights = preset.optim.loss_weights
    terms = {"recon": losses.reconstruction_loss(out.recon, out.feature)}
    if "preheat" in weights:
        first = out.slots[:, 0] if out.slots.dim() == 4 else out.slots  # video: frame-0 slots only
        terms["preheat"] = losses.preheat_loss(out.qinit, first)
    if "ssc" in weights:
        terms["ssc"] = losses.slot_contrast_loss(out.slots.float())
    return {name: weights[name] * value for name, value in terms.items()}


def forward_losses(model: nn.Module, batch: dict, preset: Preset):
    """Runs the model on a batch and returns (output, weighted losses). Recognition losses may be None when
    no slot matched an object (the step is then skipped)."""
    pixels, condit = model_inputs(batch, preset)
    if preset.model.arch == "recognition":
        out = model(pixels, condit, None, batch["segment"], batch["clazz"], batch["bbox"])
        pair = losses.recognition_losses(out.class_logits.float(), out.class_target, out.box_pred.float(), out.box_target)
        if pair is None:
            return out, None
        weights = preset.optim.loss_weights
        return out, {"ce": weights["ce"] * pair[0], "l1": weights["l1"] * pair[1]}
    out = model(pixels, condit)
    return out, discovery_losses(out, preset)


@torch.no_grad()
def discovery_metrics(out, segment: torch.Tensor, official_compat: bool = False) -> dict[str, torch.Tensor]:
    """Per-sample ARI, ARI-fg, mBO, mIoU from the decoder attention (docs/official.md §7.1–7.2); a video is one sample.

    Shapes: out.attn_dec (B, [T,] S, h, w); segment (B, [T,] H, W, C) bool → each metric (B,) float64.
    """
    size = tuple(segment.shape[-3:-1])
    pred = metrics.segments_from_attention(out.attn_dec.float(), size, official_compat)  # (B, [T,] H, W, S)
    b = segment.shape[0]
    pred = pred.reshape(b, -1, pred.shape[-1])  # (B, M, S)
    true = segment.reshape(b, -1, segment.shape[-1])  # (B, M, C)
    return {
        "ari": metrics.ari(pred, true, official_compat=official_compat),
        "ari_fg": metrics.ari(pred, true, fg=True, official_compat=official_compat),
        "mbo": metrics.mbo(pred, true),
        "miou": metrics.miou(pred, true),
    }


@torch.no_grad()
def recognition_scores(out) -> dict:
    return metrics.recognition_metrics(out.class_logits.float(), out.class_target, out.box_pred.float(), out.box_target)

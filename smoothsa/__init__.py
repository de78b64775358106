"""SmoothSA: object-centric learning by slot attention over frozen DINOv2 features, checkpoint-compatible
with the official code (arXiv 2508.05417), with fused Triton kernels.

    import smoothsa
    model = smoothsa.build_model("smoothsa_r-coco")
    smoothsa.load_official(model, "smoothsa_r-coco/42-0025.pth")  # or, to train: smoothsa.load_dinov2(model)
    out = model(images)  # SlotOutput(feature, qinit, slots, attn_enc, recon, attn_dec)
"""
from smoothsa.build import build_model, compile_model
from smoothsa.checkpoint import load_official, official_state_dict
from smoothsa.models import SPOT, SlotOutput, SmoothSA, SmoothSAVideo
from smoothsa.pretrained import load_dinov2
from smoothsa.presets import PRESETS, get_preset
from smoothsa.slot_attention import SlotAttention

__all__ = [
    "build_model",
    "compile_model",
    "load_official",
    "load_dinov2",
    "official_state_dict",
    "SlotAttention",
    "SmoothSA",
    "SmoothSAVideo",
    "SPOT",
    "SlotOutput",
    "PRESETS",
    "get_preset",
]

"""Fused Triton kernels for SmoothSA and their plain-PyTorch twins (`smoothsa.kernels.reference`).

triton is optional: without it `fused_step_supported` returns a reason and callers run the reference.
"""
import importlib.util

from .reference import gru_cell, slot_attention_step

if importlib.util.find_spec("triton") is not None:
    from .slot_attention import fused_slot_attention_step, fused_step_supported
else:

    def fused_step_supported(input, query) -> str | None:
        """Always a reason: the fused step needs triton."""
        return "triton not installed"

    def fused_slot_attention_step(*args, **kwargs):
        raise RuntimeError("fused_slot_attention_step needs triton (pip install triton); use slot_attention_step")


__all__ = ["fused_slot_attention_step", "fused_step_supported", "gru_cell", "slot_attention_step"]

"""Fused Triton kernels for SmoothSA and their plain-PyTorch twins (`smoothsa.kernels.reference`)."""
from .reference import gru_cell, slot_attention_step

__all__ = ["gru_cell", "slot_attention_step"]

"""Slot attention with bi-level truncated back-propagation (docs/official.md §2.6).

Shapes: B batch, N tokens, S slots, D slot channels (256), Dv token channels (384).
"""
import os
import warnings

import torch
import torch.nn as nn

from smoothsa.kernels.reference import slot_attention_step
from smoothsa.mlp import mlp

TRUNCATIONS = (None, "bi-level")


def use_fused_kernels(flag: bool | None = None) -> bool:
    """Whether slot attention should take the fused Triton path.

    An explicit `flag` wins; otherwise the environment variable `SMOOTHSA_FUSED` decides ("0" off, anything
    else on), and the default is on. Whether a given call can actually run fused (CUDA tensors, or CPU tensors
    under `TRITON_INTERPRET=1`, and a supported shape) is decided per call by `smoothsa.kernels`.
    """
    if flag is not None:
        return bool(flag)
    return os.environ.get("SMOOTHSA_FUSED", "1") != "0"


class SlotAttention(nn.Module):
    """Iterative slot attention: slots compete for tokens (softmax over slots), then a GRU + MLP update.

    Args:
        num_iter: iterations per call (overridable per call, e.g. 1 on video frames after the first).
        embed_dim: slot channels D.
        ffn_dim: hidden width of the residual MLP.
        dropout: dropout inside the residual MLP (0 in every config: no module is inserted).
        kv_dim: token channels Dv.
        trunc_bp: "bi-level" (SmoothSA: gradients flow only through the last iteration, whose input is
            re-attached to the initial query) or None (full back-propagation, SPOT).
        fused: take the fused kernel path when it can run; None reads `SMOOTHSA_FUSED`.

    Shapes:
        input (B, N, Dv), query (B, S, D) → slots (B, S, D), attn (B, S, N): the last iteration's attention,
        softmax over slots, computed from the slots entering that iteration, not renormalised.
    """

    def __init__(
        self,
        num_iter: int = 3,
        embed_dim: int = 256,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        kv_dim: int = 384,
        trunc_bp: str | None = "bi-level",
        fused: bool | None = None,
    ):
        super().__init__()
        if trunc_bp not in TRUNCATIONS:
            raise ValueError(f"SlotAttention: trunc_bp must be one of {TRUNCATIONS}, got {trunc_bp!r}")
        if num_iter < 1:
            raise ValueError(f"SlotAttention: num_iter must be >= 1, got {num_iter}")
        self.num_iter = num_iter
        self.embed_dim = embed_dim
        self.kv_dim = kv_dim
        self.trunc_bp = trunc_bp
        self.fused = use_fused_kernels(fused)
        # Registration order = the official state_dict order.
        self.norm1q = nn.LayerNorm(embed_dim)
        self.proj_q = nn.Linear(embed_dim, embed_dim, bias=False)
        self.norm1kv = nn.LayerNorm(kv_dim)
        self.proj_k = nn.Linear(kv_dim, embed_dim, bias=False)
        self.proj_v = nn.Linear(kv_dim, embed_dim, bias=False)
        self.rnn = nn.GRUCell(embed_dim, embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.ffn = mlp(embed_dim, [ffn_dim, embed_dim], dropout=dropout)

    def forward(self, input: torch.Tensor, query: torch.Tensor, num_iter: int | None = None):
        if input.dim() != 3 or input.shape[-1] != self.kv_dim:
            raise ValueError(f"SlotAttention: input must be (B, N, {self.kv_dim}), got {tuple(input.shape)}")
        if query.dim() != 3 or query.shape[-1] != self.embed_dim or query.shape[0] != input.shape[0]:
            raise ValueError(
                f"SlotAttention: query must be (B, S, {self.embed_dim}) with B = {input.shape[0]}, got {tuple(query.shape)}"
            )
        num_iter = num_iter or self.num_iter
        step = self._step_function(input, query)
        kv = self.norm1kv(input)
        k = self.proj_k(kv)  # (B, N, D)
        v = self.proj_v(kv)  # (B, N, D)
        scale = self.embed_dim**-0.5
        rnn = self.rnn
        bilevel = self.trunc_bp == "bi-level"
        grad_enabled = torch.is_grad_enabled()
        slots = query
        attn = None
        for it in range(num_iter):
            last = it == num_iter - 1
            # Under bi-level truncation nothing flows back through iterations 0..K-2, so they run without a
            # graph: same values as the official code, and their activations are never stored.
            with torch.set_grad_enabled(grad_enabled and (last or not bilevel)):
                if last and bilevel:
                    slots = slots.detach() + query - query.detach()  # value of slots, gradient of query
                q = self.proj_q(self.norm1q(slots))  # (B, S, D)
                slots_new, attn = step(q, k, v, slots, rnn.weight_ih, rnn.weight_hh, rnn.bias_ih, rnn.bias_hh, scale)
                slots = slots_new + self.ffn(self.norm2(slots_new))
        return slots, attn

    def _step_function(self, input: torch.Tensor, query: torch.Tensor):
        if not self.fused:
            return slot_attention_step
        from smoothsa import kernels

        fused = getattr(kernels, "fused_slot_attention_step", None)
        supported = getattr(kernels, "fused_step_supported", None)
        if fused is None or supported is None:
            return slot_attention_step
        reason = supported(input, query)
        if reason is not None:
            _warn_once(f"SlotAttention: fused kernels not used ({reason}); running the PyTorch reference")
            return slot_attention_step
        return fused


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)

"""Every attention in the package goes through `attend`: PyTorch's fused scaled-dot-product attention by
default, xformers' memory-efficient attention when it is installed and the tensors are on CUDA.

`MultiheadAttention` and `TransformerDecoderLayer` keep the parameter names of `torch.nn.MultiheadAttention`
and `torch.nn.TransformerDecoderLayer` (`in_proj_weight`, `out_proj`, `linear1`, `norm1`, …) so the official
checkpoints load into them, but never ask the fused kernel for its attention weights: a caller that needs the
head-averaged map (the decoder's last cross-attention) gets it from `attention_weights`, computed beside the
fused kernel from the same projections. With only S slots as keys that costs an (N × S) matrix per head.

Shapes: B batch, L query length, M key length, H heads, E head channels, D = H·E model channels.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional extra: `pip install smoothsa[xformers]`
    import xformers.ops as xops
except ImportError:  # pragma: no cover - depends on the environment
    xops = None


def use_xformers(q: torch.Tensor) -> bool:
    return xops is not None and q.is_cuda and os.environ.get("SMOOTHSA_XFORMERS", "1") != "0"


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, dropout: float = 0.0
) -> torch.Tensor:
    """Softmax attention over keys with scale E^-1/2.

    Shapes: q (B, H, L, E), k and v (B, H, M, E) → (B, H, L, E).
    """
    if use_xformers(q):
        bias = xops.LowerTriangularMask() if causal else None
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout
        )  # (B, L, H, E)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)


class MultiheadAttention(nn.Module):
    """`nn.MultiheadAttention(batch_first=True)` with the same parameters, routed through `attend`.

    Args:
        embed_dim: model channels D.
        num_heads: H; D must be divisible by H.
        dropout: attention-weight dropout (training only), as in `nn.MultiheadAttention`.
        bias: whether the input and output projections have biases.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: torch.Tensor, which: int) -> torch.Tensor:
        d = self.embed_dim
        weight = self.in_proj_weight[which * d : (which + 1) * d]
        bias = None if self.in_proj_bias is None else self.in_proj_bias[which * d : (which + 1) * d]
        x = F.linear(x, weight, bias)  # (B, L, D)
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, H, L, E)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool = False, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Shapes: query (B, L, D), key and value (B, M, D) → output (B, L, D) and, when `need_weights`, the
        head-averaged attention (B, L, M) (softmax over the M keys)."""
        q = self._heads(query, 0)
        k = self._heads(key, 1)
        v = self._heads(value, 2)
        dropout = self.dropout if self.training else 0.0
        out = attend(q, k, v, causal=causal, dropout=dropout)  # (B, H, L, E)
        out = self.out_proj(out.transpose(1, 2).flatten(2))  # (B, L, D)
        weights = attention_weights(q, k, causal) if need_weights else None
        return out, weights


def attention_weights(q: torch.Tensor, k: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Head-averaged softmax attention, (B, H, L, E) × (B, H, M, E) → (B, L, M)."""
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, H, L, M)
    if causal:
        mask = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(mask, float("-inf"))
    return logits.softmax(-1).mean(1)


class TransformerDecoderLayer(nn.Module):
    """`nn.TransformerDecoderLayer(batch_first=True, activation="gelu")` with the same parameter names.

    Args:
        d_model, nhead, dim_feedforward, dropout, norm_first, bias: as in PyTorch.
        cross_first: the "swapped" layer of the preheated initializers (docs/official.md §2.3): cross-attention on the
            un-normalised queries first, then self-attention, then the feed-forward; it has no `norm2`.

    Shapes: x (B, L, D), memory (B, M, D) → (B, L, D); with `need_weights` also the head-averaged
    cross-attention (B, L, M).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float = 0.0,
        norm_first: bool = True,
        bias: bool = False,
        cross_first: bool = False,
        eps: float = 1e-5,
    ):
        super().__init__()
        if cross_first and not norm_first:
            raise ValueError("TransformerDecoderLayer: the swapped (cross_first) layer is pre-norm only")
        self.norm_first = norm_first
        self.cross_first = cross_first
        # Registration order = the official state_dict order.
        self.self_attn = MultiheadAttention(d_model, nhead, dropout, bias)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout, bias)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias)
        self.norm1 = nn.LayerNorm(d_model, eps=eps, bias=bias)
        # The swapped layer's cross-attention sees its queries un-normalised: its norm2 does not exist.
        self.norm2 = nn.Identity() if cross_first else nn.LayerNorm(d_model, eps=eps, bias=bias)
        self.norm3 = nn.LayerNorm(d_model, eps=eps, bias=bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def _self_block(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        return self.dropout1(self.self_attn(x, x, x, causal=causal)[0])

    def _cross_block(self, x: torch.Tensor, memory: torch.Tensor, need_weights: bool):
        out, weights = self.multihead_attn(x, memory, memory, need_weights=need_weights)
        return self.dropout2(out), weights

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(self.linear2(self.dropout(F.gelu(self.linear1(x)))))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, causal: bool = False, need_weights: bool = False):
        if self.cross_first:
            out, weights = self._cross_block(self.norm2(x), memory, need_weights)
            x = x + out
            x = x + self._self_block(self.norm1(x), causal)
            x = x + self._ff_block(self.norm3(x))
        elif self.norm_first:
            x = x + self._self_block(self.norm1(x), causal)
            out, weights = self._cross_block(self.norm2(x), memory, need_weights)
            x = x + out
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._self_block(x, causal))
            out, weights = self._cross_block(x, memory, need_weights)
            x = self.norm2(x + out)
            x = self.norm3(x + self._ff_block(x))
        return x, weights

"""Slot decoders that reconstruct the DINOv2 tokens from the slots (docs/official.md §2.8, §2.9).

Both stack 4 pre-norm transformer decoder layers (self-attention over tokens, cross-attention to the slots)
with the "norm0 trick": layer 0's self-attention pre-norm is hoisted out as `norm0`, so the residual stream
starts normalised. The last layer's cross-attention, averaged over heads, is the decoder attention map used
for segmentation.

Shapes: B batch, N tokens, S slots, D token channels (384), Ds slot channels (256).
"""
import copy
import math

import torch
import torch.nn as nn

from smoothsa.attention import TransformerDecoderLayer
from smoothsa.backbone import sincos_position_code

# The official short keep length is int(256 * 0.1) - 1, hard-coded whatever the token count.
SHORT_KEEP = 24


class LearntPositionalEmbedding(nn.Module):
    """A learnt table `_pe` (1, N, D). `init`: "trunc_normal" (official: N(0, 1) cut at ±2) or "sincos" (the
    fixed 2-D code of `smoothsa.backbone.sincos_position_code` on a square grid, so neighbours start alike)."""

    def __init__(self, resolut: int, embed_dim: int, init: str = "trunc_normal"):
        super().__init__()
        self._pe = nn.Parameter(torch.empty(1, resolut, embed_dim))
        if init == "trunc_normal":
            nn.init.trunc_normal_(self._pe, mean=0.0, std=1.0, a=-2.0, b=2.0)
        elif init == "sincos":
            grid = math.isqrt(resolut)
            if grid * grid != resolut:
                raise ValueError(f"LearntPositionalEmbedding: sincos init needs a square token count, got {resolut}")
            with torch.no_grad():
                self._pe.copy_(sincos_position_code(grid, embed_dim)[None])
        else:
            raise ValueError(f"LearntPositionalEmbedding: unknown init {init!r}; known: trunc_normal, sincos")


class DecoderStack(nn.Module):
    """`nn.TransformerDecoder` without final norm, whose layers return the last cross-attention map."""

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        # Deep copies of one layer, as `nn.TransformerDecoder` does: all layers start from the same weights.
        layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout=0.0, norm_first=True, bias=False)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, causal: bool = False):
        last = len(self.layers) - 1
        weights = None
        for i, layer in enumerate(self.layers):
            x, weights = layer(x, memory, causal=causal, need_weights=i == last)
        return x, weights  # (B, N, D), (B, N, S)


class _SlotDecoder(nn.Module):
    def _build(self, embed_dim: int, slot_dim: int, num_layers: int, num_heads: int, ffn_dim: int) -> None:
        self.project1 = nn.Sequential(nn.Linear(embed_dim, embed_dim, bias=False), nn.LayerNorm(embed_dim))
        self.project2 = nn.Sequential(nn.Linear(slot_dim, embed_dim, bias=False), nn.LayerNorm(embed_dim))
        backbone = DecoderStack(num_layers, embed_dim, num_heads, ffn_dim)
        self.norm0 = backbone.layers[0].norm1  # the norm0 trick (see the module docstring)
        backbone.layers[0].norm1 = nn.Identity()
        self.backbone = backbone

    def _check(self, input: torch.Tensor, slots: torch.Tensor) -> None:
        d = self.project1[0].in_features
        ds = self.project2[0].in_features
        if input.dim() != 3 or input.shape[-1] != d:
            raise ValueError(f"{type(self).__name__}: tokens must be (B, N, {d}), got {tuple(input.shape)}")
        if slots.dim() != 3 or slots.shape[-1] != ds or slots.shape[0] != input.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: slots must be (B={input.shape[0]}, S, {ds}), got {tuple(slots.shape)}"
            )


class ARRandTransformerDecoder(_SlotDecoder):
    """SmoothSA's decoder: in training a random subset of tokens is visible and the rest are mask tokens.

    Args:
        resolut: number of token positions N (16·16).
        embed_dim: token channels D.
        slot_dim: slot channels Ds.
        num_layers, num_heads, ffn_dim: the transformer (4, 4, 1536).
        p: probability of a uniformly random visible count in {0..N−2}; otherwise `SHORT_KEEP` tokens.
        pe_init: the positional table's initialisation, "trunc_normal" (official) or "sincos".

    Shapes: input (B, N, D) feature tokens, slots (B, S, Ds) → recon (B, N, D), attn (B, S, N).
    """

    def __init__(
        self,
        resolut: int = 256,
        embed_dim: int = 384,
        slot_dim: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        ffn_dim: int = 1536,
        p: float = 0.5,
        pe_init: str = "trunc_normal",
    ):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"ARRandTransformerDecoder: p must lie in [0, 1], got {p}")
        self.p = p
        self.mask_token = nn.Parameter(torch.randn(1, 1, embed_dim) * embed_dim**-0.5)
        self.posit_embed = LearntPositionalEmbedding(resolut, embed_dim, pe_init)
        self._build(embed_dim, slot_dim, num_layers, num_heads, ffn_dim)

    def visible_mask(self, b: int, n: int, device: torch.device) -> torch.Tensor:
        """(B, N) bool: which tokens the decoder sees in training.

        The official decoder shuffles the tokens per sample, keeps the first `keep` real and masks the rest,
        then un-shuffles. Nothing in the decoder is causal, so that is exactly "a uniformly random subset of
        `keep` positions is visible"; drawing the subset directly gives the same distribution without the
        gather/scatter.
        """
        long_keep = torch.randint(0, n - 1, (b,), device=device)
        use_long = torch.rand(b, device=device) < self.p
        keep = torch.where(use_long, long_keep, torch.full_like(long_keep, SHORT_KEEP))  # (B,)
        rank = torch.rand(b, n, device=device).argsort(dim=1).argsort(dim=1)  # (B, N) random permutation ranks
        return rank < keep[:, None]

    def forward(self, input: torch.Tensor, slots: torch.Tensor):
        self._check(input, slots)
        b, n, _ = input.shape
        tokens = self.project1(input)  # (B, N, D)
        if self.training:
            visible = self.visible_mask(b, n, input.device)[..., None]  # (B, N, 1)
            tokens = torch.where(visible, tokens, self.mask_token.to(tokens.dtype))
        query = tokens + self.posit_embed._pe[:, :n]
        memory = self.project2(slots)  # (B, S, D)
        recon, attn = self.backbone(self.norm0(query), memory)
        return recon, attn.transpose(1, 2)  # (B, N, D), (B, S, N)


def spot_orders(height: int, width: int) -> torch.Tensor:
    """The nine token orders of SPOT's decoder over an H × W grid (index r·W + c), docs/official.md §2.9.

    Returns a (9, H·W) long tensor: raster; columns left→right each top→bottom; columns right→left each
    top→bottom; rows top→bottom each right→left; columns right→left each bottom→top; rows bottom→top each
    right→left; columns left→right each bottom→top; rows bottom→top each left→right; and the reverse of the
    inward spiral that starts at the top-right corner going down (so it starts at the centre).
    """
    grid = torch.arange(height * width).view(height, width)
    orders = [
        grid.flatten(),
        grid.t().flatten(),
        grid.flip(1).t().flatten(),
        grid.flip(1).flatten(),
        grid.flip(0).flip(1).t().flatten(),
        grid.flip(0).flip(1).flatten(),
        grid.flip(0).t().flatten(),
        grid.flip(0).flatten(),
    ]
    spiral = []
    top, bottom, left, right = 0, height - 1, 0, width - 1
    while top <= bottom and left <= right:
        spiral += [grid[r, right].item() for r in range(top, bottom + 1)]  # down the right column
        spiral += [grid[bottom, c].item() for c in range(right - 1, left - 1, -1)]  # along the bottom row
        if left < right:
            spiral += [grid[r, left].item() for r in range(bottom - 1, top - 1, -1)]  # up the left column
        if top < bottom:
            spiral += [grid[top, c].item() for c in range(left + 1, right)]  # along the top row
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    orders.append(torch.tensor(spiral[::-1]))
    return torch.stack(orders)


class AR9TransformerDecoder(_SlotDecoder):
    """SPOT's autoregressive decoder: causal over one of nine token orders, with a start token per order.

    Args:
        resolut: the token grid (H, W).
        embed_dim, slot_dim, num_layers, num_heads, ffn_dim: as `ARRandTransformerDecoder`.

    Training picks one order uniformly at random, evaluation uses raster order, unless `order` (an int, or a
    long tensor of one element) is given.
    No positional embedding.

    Shapes: input (B, N, D) feature tokens, slots (B, S, Ds) → recon (B, N, D), attn (B, S, N).
    """

    def __init__(
        self,
        resolut: tuple[int, int] = (16, 16),
        embed_dim: int = 384,
        slot_dim: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        ffn_dim: int = 1536,
    ):
        super().__init__()
        self.bos = nn.Parameter(torch.randn(9, 1, 1, embed_dim) * embed_dim**-0.5)
        self.register_buffer("perm", spot_orders(*resolut), persistent=False)
        self._build(embed_dim, slot_dim, num_layers, num_heads, ffn_dim)

    def forward(self, input: torch.Tensor, slots: torch.Tensor, order: int | torch.Tensor | None = None):
        self._check(input, slots)
        b, n, _ = input.shape
        if n != self.perm.shape[1]:
            raise ValueError(f"AR9TransformerDecoder: built for {self.perm.shape[1]} tokens, got {n}")
        if order is None:
            # The training order stays on the device, a (1,) tensor that selects by indexing: no host sync, and
            # one compiled graph serves all nine orders. (The official code draws it with np.random.choice.)
            order = torch.randint(0, 9, (1,), device=input.device) if self.training else 0
        elif torch.is_tensor(order):
            order = order.reshape(1)
        perm = self.perm[order].view(n)  # (N,)
        start = self.bos[order].view(1, 1, -1).expand(b, 1, -1)  # (B, 1, D)
        shifted = torch.cat([start.to(input.dtype), input[:, perm[:-1]]], dim=1)
        query = self.project1(shifted)  # (B, N, D)
        memory = self.project2(slots)
        out, attn = self.backbone(self.norm0(query), memory, causal=True)  # in permuted order
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(n, device=perm.device)
        return out[:, inverse], attn[:, inverse].transpose(1, 2)  # (B, N, D), (B, S, N)

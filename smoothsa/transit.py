"""`RSFQTransit`: turns past slots and frame features into the next frame's slot-attention query (docs/official.md §2.7).

Shapes: B batch, Tp past frames, N tokens, S slots, D slot channels (256), Dv token channels (384).
"""
import torch
import torch.nn as nn

from smoothsa.attention import TransformerDecoderLayer


class RSFQTransit(nn.Module):
    """A post-norm transformer decoder layer over (previous slots + Δt embedding) attending to projected features.

    In training (and when more than one past frame is in the window) each sample takes its slots from a random
    past frame and its features from a random frame after that, and embeds both time offsets, so the transit
    learns to bridge gaps; in evaluation it bridges exactly one frame.

    Args:
        dt: window length (= the training clip length); the Δt embedding has dt entries.
        ci: feature channels Dv; c: slot channels D; nhead, expanz: heads and feed-forward expansion.
        pdo: dropout of the layer (training only); norm_first, bias: as `nn.TransformerDecoderLayer`.

    Shapes: slots (B, Tp, S, D) of all past frames, encodes (B, Tp+1, N, Dv) of the past frames and the current
    one → query (B, S, D).
    """

    def __init__(
        self, dt: int, ci: int = 384, c: int = 256, nhead: int = 4, expanz: int = 4, pdo: float = 0.5,
        norm_first: bool = False, bias: bool = False,
    ):
        super().__init__()
        self.dt = dt
        self.te = nn.Embedding(dt, c)
        self.proji = nn.Linear(ci, c)
        self.transit = TransformerDecoderLayer(c, nhead, c * expanz, dropout=pdo, norm_first=norm_first, bias=bias)

    def forward(self, slots: torch.Tensor, encodes: torch.Tensor) -> torch.Tensor:
        if slots.dim() != 4 or encodes.dim() != 4 or encodes.shape[1] != slots.shape[1] + 1:
            raise ValueError(
                f"RSFQTransit: need slots (B, Tp, S, D) and encodes (B, Tp+1, N, Dv), got {tuple(slots.shape)} and "
                f"{tuple(encodes.shape)}"
            )
        slots = slots[:, -(self.dt - 1) :]  # the last dt−1 slot frames
        encodes = encodes[:, -self.dt :]  # … and the dt feature frames ending at the current one
        b, i = slots.shape[:2]
        if self.training and i > 1:
            batch = torch.arange(b, device=slots.device)
            ts = torch.randint(0, i, (b,), device=slots.device)
            tf = torch.randint(1, i + 1, (b,), device=slots.device)  # may be a past frame
            source_slots = slots[batch, ts]  # (B, S, D)
            source_feats = encodes[batch, tf]  # (B, N, Dv)
            dts, dtf = i - ts, i - tf
        else:
            source_slots = slots[:, -1]
            source_feats = encodes[:, -1]
            dts = torch.ones(b, dtype=torch.long, device=slots.device)
            dtf = torch.zeros(b, dtype=torch.long, device=slots.device)
        x = source_slots.detach() + self.te(dts)[:, None]  # (B, S, D)
        memory = self.proji(source_feats.detach()) + self.te(dtf)[:, None]  # (B, N, D)
        return self.transit(x, memory)[0]

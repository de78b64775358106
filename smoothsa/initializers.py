"""Slot initializers (docs/official.md §2.3–§2.5, §2.9).

The preheated initializers draw `smpl = mean + ε·exp(logstd)` and refine it by one swapped transformer
decoder layer that first cross-attends to the frame's features; the result `qinit` is trained to predict the
final slots (the preheat loss), and its stop-gradient is the slot-attention query.

Shapes: B batch, N tokens, S slots, D slot channels (256), Dv token channels (384).
"""
import torch
import torch.nn as nn

from smoothsa.attention import TransformerDecoderLayer
from smoothsa.mlp import mlp


def _noise(shape: tuple[int, ...], like: torch.Tensor, noise: torch.Tensor | None, what: str) -> torch.Tensor:
    if noise is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"{what}: init_noise must have shape {tuple(shape)} (B, S, D), got {tuple(noise.shape)}")
    return noise.to(like)


class _Preheated(nn.Module):
    """Shared part of the preheated initializers: the swapped layer, the query noise and `detach_flag`."""

    def _build_preheat(self, emb_dim: int, kv_dim: int) -> None:
        self.logstd2 = nn.Parameter(torch.zeros(1, 1, emb_dim))
        # Scheduled by training (on for the first 10 % of steps); persistent, so checkpoints carry it.
        self.register_buffer("detach_flag", torch.tensor(True))

    def _build_layers(self, emb_dim: int, kv_dim: int) -> None:
        self.qproj_kv = nn.Linear(kv_dim, emb_dim)
        self.qinit = TransformerDecoderLayer(
            emb_dim, 4, emb_dim * 4, dropout=0.0, norm_first=True, bias=False, cross_first=True
        )

    def _preheat(self, smpl: torch.Tensor, encode: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Keeps the preheat loss out of encode_project early in training. A select, not an `if` on the
        # buffer: same values and gradients, but no host sync and no graph break under torch.compile.
        encode = torch.where(self.detach_flag, encode.detach(), encode)
        qinit = self.qinit(smpl, self.qproj_kv(encode))[0]  # (B, S, D)
        query = qinit.detach()
        if self.training:
            # Trains logstd2 through the reconstruction loss (via the last slot-attention iteration).
            query = query + torch.randn_like(query) * self.logstd2.exp()
        return qinit, query


class NormalSharedPreheated(_Preheated):
    """One learnt Gaussian shared by all S slots, refined by the swapped layer (docs/official.md §2.4).

    Args:
        num: number of slots S.
        emb_dim: slot channels D.
        kv_dim: token channels Dv.

    Shapes: encode (B, N, Dv) → qinit (B, S, D) with its graph, query (B, S, D) detached (+ noise in training).
    """

    def __init__(self, num: int, emb_dim: int = 256, kv_dim: int = 384):
        super().__init__()
        self.num = num
        self.mean = nn.Parameter(torch.zeros(1, 1, emb_dim))
        self.logstd = nn.Parameter(torch.zeros(1, 1, emb_dim))
        self._build_preheat(emb_dim, kv_dim)
        self._build_layers(emb_dim, kv_dim)

    def forward(self, encode: torch.Tensor, condit: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        if condit is not None:
            raise ValueError("NormalSharedPreheated takes no condit (its S slots share one learnt mean)")
        b, d = encode.shape[0], self.mean.shape[-1]
        eps = _noise((b, self.num, d), self.mean, noise, type(self).__name__)
        # The noise is drawn in eval too: it is the only thing that makes the S slots differ.
        smpl = self.mean.expand(b, self.num, d) + eps * self.logstd.exp()
        return self._preheat(smpl, encode)


class NormalMlpPreheated(_Preheated):
    """Per-slot Gaussian means from a condition vector (first-frame boxes), refined by the swapped layer.

    Args:
        in_dim: condition channels (4: l, t, r, b).
        dims: MLP widths; the last is the slot channels D.
        kv_dim: token channels Dv.
        mlpln: LayerNorm placement of the MLP ("post" in the MOVi configs).
        pad_value: the box value of batch padding (−1); kept for the record, padded slots are ordinary slots.

    Shapes: encode (B, N, Dv), condit (B, S, in_dim) → qinit, query (B, S, D).
    """

    def __init__(
        self, in_dim: int = 4, dims: tuple[int, ...] = (256, 256), kv_dim: int = 384, mlpln: str = "post", pad_value: float = -1
    ):
        super().__init__()
        emb_dim = dims[-1]
        self.in_dim = in_dim
        self.pad_value = pad_value
        self.logstd = nn.Parameter(torch.zeros(1, 1, emb_dim))
        self._build_preheat(emb_dim, kv_dim)
        self.mlp = mlp(in_dim, dims, ln=mlpln)
        self._build_layers(emb_dim, kv_dim)

    def forward(self, encode: torch.Tensor, condit: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        if condit is None or condit.dim() != 3 or condit.shape[-1] != self.in_dim or condit.shape[0] != encode.shape[0]:
            got = None if condit is None else tuple(condit.shape)
            raise ValueError(
                f"NormalMlpPreheated: condit must be (B={encode.shape[0]}, S, {self.in_dim}) first-frame boxes, got {got}"
            )
        mean = self.mlp(condit.to(self.logstd.dtype))  # (B, S, D)
        eps = _noise(tuple(mean.shape), mean, noise, type(self).__name__)
        smpl = mean + eps * self.logstd.exp()
        return self._preheat(smpl, encode)


class NormalShared(nn.Module):
    """SPOT's initializer: one learnt Gaussian for all slots, sampled in train and eval (docs/official.md §2.9).

    Shapes: batch size B → slots (B, S, D).
    """

    def __init__(self, num: int, dim: int = 256):
        super().__init__()
        self.num = num
        self.mean = nn.Parameter(torch.empty(1, 1, dim))
        self.logstd = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.xavier_uniform_(self.mean)
        nn.init.xavier_uniform_(self.logstd)

    def forward(self, batch_size: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        d = self.mean.shape[-1]
        eps = _noise((batch_size, self.num, d), self.mean, noise, type(self).__name__)
        return self.mean.expand(batch_size, self.num, d) + eps * self.logstd.exp()


class NormalSeparat(nn.Module):
    """A learnt mean per slot; noise only in training (the SPOT distillation student, docs/official.md §2.9).

    Shapes: batch size B → slots (B, S, D).
    """

    def __init__(self, num: int, dim: int = 256):
        super().__init__()
        self.num = num
        self.mean = nn.Parameter(torch.empty(1, num, dim))
        self.logstd = nn.Parameter(torch.full((1, 1, dim), -0.5 * torch.log(torch.tensor(float(dim))).item()))
        nn.init.xavier_uniform_(self.mean[0])

    def forward(self, batch_size: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        slots = self.mean.expand(batch_size, -1, -1)
        if self.training:
            slots = slots + _noise(tuple(slots.shape), slots, noise, type(self).__name__) * self.logstd.exp()
        return slots

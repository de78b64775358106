"""The official `MLP` builder: an `nn.Sequential` whose indices match the official checkpoint keys."""
from typing import Sequence

import torch.nn as nn


def mlp(in_dim: int, dims: Sequence[int], ln: str | None = None, dropout: float = 0.0, bias: bool = True) -> nn.Sequential:
    """[LayerNorm(in_dim)] → Linear → GELU → [Dropout] → … → Linear → [LayerNorm(last)].

    Args:
        in_dim: input channels.
        dims: output channels of each Linear; every Linear but the last is followed by GELU (and Dropout when
            `dropout > 0`; with 0 no module is inserted, so the indices of later layers do not shift).
        ln: "pre" puts a LayerNorm first, "post" one last, None none.
        dropout: dropout probability after each hidden GELU.
        bias: whether the Linears have biases.
    """
    if ln not in (None, "pre", "post"):
        raise ValueError(f"mlp: ln must be None, 'pre' or 'post', got {ln!r}")
    layers: list[nn.Module] = [nn.LayerNorm(in_dim)] if ln == "pre" else []
    width = in_dim
    for i, dim in enumerate(dims):
        layers.append(nn.Linear(width, dim, bias=bias))
        if i < len(dims) - 1:
            layers.append(nn.GELU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        width = dim
    if ln == "post":
        layers.append(nn.LayerNorm(width))
    return nn.Sequential(*layers)

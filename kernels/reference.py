"""Plain-PyTorch twins of the fused kernels.

Each function here computes exactly what its fused counterpart computes, with ordinary autograd, so it
serves as (a) the CPU / fallback path and (b) the reference the kernel tests compare against in float64.

Shapes: B batch, S slots, N tokens, D slot channels (256 in every config).
"""
import torch
import torch.nn.functional as F


def gru_cell(
    inputs: torch.Tensor,
    hidden: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor,
    bias_hh: torch.Tensor,
) -> torch.Tensor:
    """`torch.nn.GRUCell` on (..., D) tensors, PyTorch's gate layout [r; z; n].

    r = σ(W_ir u + b_ir + W_hr x + b_hr), z = σ(W_iz u + b_iz + W_hz x + b_hz),
    n = tanh(W_in u + b_in + r ⊙ (W_hn x + b_hn)), y = (1 − z) ⊙ n + z ⊙ x.
    """
    gates_i = F.linear(inputs, weight_ih, bias_ih)  # (..., 3D)
    gates_h = F.linear(hidden, weight_hh, bias_hh)  # (..., 3D)
    i_r, i_z, i_n = gates_i.chunk(3, dim=-1)
    h_r, h_z, h_n = gates_h.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (hidden - n)  # = (1 - z) * n + z * hidden


def slot_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    hidden: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor,
    bias_hh: torch.Tensor,
    scale: float,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One slot-attention iteration without the LayerNorms, projections and the residual MLP.

    logits = scale · q kᵀ; a0 = softmax over the *slot* axis; a = a0 / (Σ_tokens a0 + eps);
    u = a v; slots = GRUCell(u, hidden).

    Args:
        q: projected queries proj_q(norm1q(slots)), unscaled.
        k, v: projected keys and values.
        hidden: the GRU hidden state (the slots entering this iteration).
        weight_ih, weight_hh, bias_ih, bias_hh: the GRUCell parameters.
        scale: logit scale, D^-1/2 in every config.
        eps: added to the per-slot attention mass before renormalising.

    Shapes:
        q, hidden: (B, S, D); k, v: (B, N, D); weight_*: (3D, D); bias_*: (3D,).
        Returns slots (B, S, D) and a0 (B, S, N), the attention before renormalisation.
    """
    logits = torch.einsum("bsd,bnd->bsn", q * scale, k)  # (B, S, N)
    attn = logits.softmax(dim=1)  # over slots: slots compete for each token
    weights = attn / (attn.sum(dim=2, keepdim=True) + eps)  # (B, S, N), per-slot weighted mean
    updates = torch.einsum("bsn,bnd->bsd", weights, v)  # (B, S, D)
    slots = gru_cell(updates, hidden, weight_ih, weight_hh, bias_ih, bias_hh)
    return slots, attn

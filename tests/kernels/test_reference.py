"""The plain-PyTorch slot-attention step against independent formulations (float64, quick).

`kernels/reference.py` is what the fused kernels are tested against, so it is checked here against
(a) an explicit float64 re-derivation with its own loops and exponentials, (b) `torch.nn.GRUCell`, and
(c) the hand-derived backward formulas the fused backward implements (see `kernels/slot_attention.py`).
"""
import pytest
import torch

from smoothsa.kernels.reference import gru_cell, slot_attention_step


def _inputs(batch: int, slots: int, tokens: int, dim: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * std

    return {
        "q": randn(batch, slots, dim),
        "k": randn(batch, tokens, dim),
        "v": randn(batch, tokens, dim),
        "hidden": randn(batch, slots, dim),
        "weight_ih": randn(3 * dim, dim, std=dim**-0.5),
        "weight_hh": randn(3 * dim, dim, std=dim**-0.5),
        "bias_ih": randn(3 * dim, std=0.1),
        "bias_hh": randn(3 * dim, std=0.1),
    }


def _independent_step(q, k, v, hidden, weight_ih, weight_hh, bias_ih, bias_hh, scale, eps=1e-5):
    """Slot attention written out per batch element and per token, GRU gates by explicit weight slices."""
    batch, slots, dim = q.shape
    out_slots, out_attn = [], []
    for b in range(batch):
        logits = (q[b] @ k[b].T) * scale  # (S, N)
        shifted = logits - logits.max(dim=0).values  # per token
        attn = shifted.exp() / shifted.exp().sum(dim=0)  # softmax over slots, token by token
        mass = torch.stack([attn[s].sum() for s in range(slots)])  # (S,)
        updates = torch.stack([(attn[s, :, None] * v[b]).sum(0) / (mass[s] + eps) for s in range(slots)])
        x = hidden[b]
        w_r, w_z, w_n = weight_ih[:dim], weight_ih[dim : 2 * dim], weight_ih[2 * dim :]
        u_r, u_z, u_n = weight_hh[:dim], weight_hh[dim : 2 * dim], weight_hh[2 * dim :]
        b_r, b_z, b_n = bias_ih[:dim], bias_ih[dim : 2 * dim], bias_ih[2 * dim :]
        c_r, c_z, c_n = bias_hh[:dim], bias_hh[dim : 2 * dim], bias_hh[2 * dim :]
        r = 1 / (1 + torch.exp(-(updates @ w_r.T + b_r + x @ u_r.T + c_r)))
        z = 1 / (1 + torch.exp(-(updates @ w_z.T + b_z + x @ u_z.T + c_z)))
        n = torch.tanh(updates @ w_n.T + b_n + r * (x @ u_n.T + c_n))
        out_slots.append((1 - z) * n + z * x)
        out_attn.append(attn)
    return torch.stack(out_slots), torch.stack(out_attn)


@pytest.mark.parametrize("batch, slots, tokens, dim", [(1, 1, 5, 8), (3, 7, 13, 16), (2, 24, 31, 8)])
def test_reference_step_matches_independent_float64(batch, slots, tokens, dim):
    inputs = _inputs(batch, slots, tokens, dim)
    slots_ref, attn_ref = slot_attention_step(**inputs, scale=dim**-0.5)
    slots_ind, attn_ind = _independent_step(**inputs, scale=dim**-0.5)
    torch.testing.assert_close(slots_ref, slots_ind, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(attn_ref, attn_ind, atol=1e-12, rtol=1e-12)
    assert torch.allclose(attn_ref.sum(dim=1), torch.ones(batch, tokens, dtype=torch.float64))


def test_reference_gru_matches_torch_grucell():
    dim = 16
    inputs = _inputs(4, 5, 1, dim, seed=1)
    cell = torch.nn.GRUCell(dim, dim).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(inputs[name])
    u, x = inputs["q"], inputs["hidden"]  # any (B, S, D) pair
    expected = cell(u.reshape(-1, dim), x.reshape(-1, dim)).view_as(x)
    actual = gru_cell(u, x, *(inputs[name] for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)


def test_reference_step_gradcheck():
    inputs = {name: t.requires_grad_() for name, t in _inputs(2, 3, 5, 4, seed=2).items()}
    names = list(inputs)

    def step(*tensors):
        return slot_attention_step(**dict(zip(names, tensors)), scale=0.5)

    assert torch.autograd.gradcheck(step, tuple(inputs.values()))


@pytest.mark.parametrize("batch, slots, tokens, dim", [(2, 1, 9, 8), (3, 7, 17, 16)])
def test_hand_derived_backward_matches_autograd(batch, slots, tokens, dim):
    """The formulas the fused backward implements, written in PyTorch, against float64 autograd."""
    scale, eps = dim**-0.5, 1e-5
    inputs = {name: t.requires_grad_() for name, t in _inputs(batch, slots, tokens, dim, seed=3).items()}
    new_slots, attn = slot_attention_step(**inputs, scale=scale, eps=eps)
    generator = torch.Generator().manual_seed(4)
    dslots = torch.randn(new_slots.shape, generator=generator, dtype=torch.float64)
    dattn = torch.randn(attn.shape, generator=generator, dtype=torch.float64)
    torch.autograd.backward((new_slots, attn), (dslots, dattn))

    q, k, v, x = (inputs[n].detach() for n in ("q", "k", "v", "hidden"))
    w_ih, w_hh, b_ih, b_hh = (inputs[n].detach() for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    a0 = torch.softmax(scale * q @ k.transpose(1, 2), dim=1)  # (B, S, N)
    mass = a0.sum(dim=2)  # (B, S)
    a = a0 / (mass[..., None] + eps)
    u = a @ v  # (B, S, D)
    gi, gh = u @ w_ih.T + b_ih, x @ w_hh.T + b_hh  # (B, S, 3D)
    r = torch.sigmoid(gi[..., :dim] + gh[..., :dim])
    z = torch.sigmoid(gi[..., dim : 2 * dim] + gh[..., dim : 2 * dim])
    n = torch.tanh(gi[..., 2 * dim :] + r * gh[..., 2 * dim :])
    # GRU backward
    dg_n = dslots * (1 - z) * (1 - n**2)
    dg_r = dg_n * gh[..., 2 * dim :] * r * (1 - r)
    dg_z = dslots * (x - n) * z * (1 - z)
    dgi = torch.cat([dg_r, dg_z, dg_n], dim=-1)
    dgh = torch.cat([dg_r, dg_z, dg_n * r], dim=-1)
    du = dgi @ w_ih
    dx = dslots * z + dgh @ w_hh
    # attention backward
    dv = a.transpose(1, 2) @ du
    da0 = (du @ v.transpose(1, 2) - (du * u).sum(-1, keepdim=True)) / (mass[..., None] + eps) + dattn
    dlogit = a0 * (da0 - (a0 * da0).sum(dim=1, keepdim=True))
    dq = scale * dlogit @ k
    dk = scale * dlogit.transpose(1, 2) @ q

    expected = {
        "q": dq, "k": dk, "v": dv, "hidden": dx,
        "weight_ih": dgi.reshape(-1, 3 * dim).T @ u.reshape(-1, dim),
        "weight_hh": dgh.reshape(-1, 3 * dim).T @ x.reshape(-1, dim),
        "bias_ih": dgi.sum(dim=(0, 1)), "bias_hh": dgh.sum(dim=(0, 1)),
    }  # fmt: skip
    for name, grad in expected.items():
        torch.testing.assert_close(inputs[name].grad, grad, atol=1e-11, rtol=1e-11, msg=lambda m: f"{name}: {m}")

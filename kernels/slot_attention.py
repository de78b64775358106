"""Fused slot-attention step: one iteration of docs/official.md §2.6 without the LayerNorms, projections and residual MLP.

Math (twin: `smoothsa.kernels.reference.slot_attention_step`), per batch element, slots s, tokens n:

    logits_sn = scale · q_s · k_n
    a0_sn     = exp(logits_sn) / Σ_s' exp(logits_s'n)          softmax over the SLOT axis: slots compete per token
    c_s       = Σ_n a0_sn                                        per-slot attention mass
    u_s       = Σ_n a0_sn v_n / (c_s + eps)                      weighted mean of the values
    slots     = GRUCell(u, hidden)                               gates [r; z; n]: u W_ihᵀ + b_ih, hidden W_hhᵀ + b_hh

Backward, with incoming dslots and dattn (= ∂L/∂a0, usually zero):

    GRU:  dn = dy (1 − z), dz = dy (x − n), dx = dy z + dg_h W_hh, du = dg_i W_ih,
          dg_n = dn (1 − n²), dr = dg_n (W_hn x + b_hn), dg_r = dr r (1 − r), dg_z = dz z (1 − z);
          dg_i = [dg_r; dg_z; dg_n], dg_h = [dg_r; dg_z; dg_n r]; dW_ih = dg_iᵀ u, dW_hh = dg_hᵀ x, db = Σ_rows dg.
    attention:  dv_n   = Σ_s a_sn du_s                        with a_sn = a0_sn / (c_s + eps)
                dA0_sn = (du_s · v_n − du_s · u_s) / (c_s + eps) + dattn_sn
                dlogit_sn = a0_sn (dA0_sn − Σ_s' a0_s'n dA0_s'n)
                dq_s = scale Σ_n dlogit_sn k_n,   dk_n = scale Σ_s dlogit_sn q_s

Shapes: q, hidden, slots, u (B, S, D); k, v (B, N, D); a0 (B, S, N); weight_* (3D, D); bias_* (3D,).
Paper shapes: B = 32, S = 7, N = 256, D = 256 (images); B = 48 (8 clips × 6 frames), S = 11 or 24 (video).

Why fuse. k and v (2·B·N·D elements) are read once by either version and dominate the bytes when S ≪ D. What
the unfused version adds is launches and intermediates: eager autograd runs 19 kernels forward (scale, bmm,
softmax, sum, add, divide, bmm, 2 addmm, 10 gate adds/activations/blends) and 35 backward, each a full pass
over a (B, S, N), (B, S, D) or (B·S, 3D) tensor, and saves most of their outputs. At the paper's shapes each
pass is microseconds of launch latency around almost no work, so the step is launch-bound. Here the forward
is 2 Triton kernels + 2 GEMMs + 4 small ops (the split reduction and the division by c + eps, over
(B, S, D)), the backward 2 Triton kernels + 4 GEMMs + 4 small ops (bias sums, dq split sum, dhidden add).

What runs where:
  * `_slot_attention_fwd_kernel`, grid (B, token splits): all S slots (padded to a power of two ≥ 16 for
    `tl.dot`) stay in registers; per tile of BLOCK_N tokens it computes the logits, the complete softmax over
    slots (all slots are in the tile), writes a0, and accumulates c and Σ a0 v in fp32. A batch element's
    tokens are split over several programs when B alone cannot fill the GPU; each split writes its partial
    sums to its own buffer row and the host sums them (a deterministic reduction, no atomics).
  * The GRU gate GEMMs stay in cuBLAS (`torch.addmm`, bias folded in) with a fused elementwise epilogue
    `_gru_fwd_kernel`. Fusing them would put six (BLOCK_M × BLOCK_D) fp32 accumulators in one program, which
    limits tiles and parallelism at M = B·S = 224; cuBLAS is good at these shapes, the backward needs cuBLAS
    anyway for dW = dgᵀ u (a reduction over all B·S rows), and the gate tensors that round-trip through memory
    (B·S·6D) are small next to k and v.
  * Backward: `_gru_bwd_kernel` (elementwise), four cuBLAS GEMMs (du, dhidden, dW_ih, dW_hh) and two bias
    sums, then `_slot_attention_bwd_kernel`, grid (B, token splits): dv, dk per token tile, dq in per-split
    fp32 partials summed on the host.
  * Saved for the backward: a0 (the returned attention, B·S·N, so the logits are never recomputed), u and c
    in fp32 (B·S·D + B·S), the gate pre-activations gi, gh (B·S·3D each); r, z, n are recomputed from gi, gh
    in the elementwise backward. Nothing of size B·N·D is saved beyond the k and v the caller holds anyway.

Precision policy. Inputs are float32, float16 or bfloat16; every dot accumulates in fp32, softmax, sums, the
division and the GRU gate math run in fp32. Dot operands are the storage dtype (fp16/bf16 → tensor cores);
for float32 the dots use IEEE fp32 (not TF32) so the fused path matches PyTorch's default fp32 matmul. a0 is
stored, and saved for the backward, in the storage dtype, as PyTorch's softmax in that dtype would.
Under autocast the public function casts q, k, v and the GRU parameters to the autocast dtype, as autocast
does for matmuls; the hidden state keeps its own dtype and `slots` comes out in it, as the reference's
`hidden - n` type promotion would give.

Autotuning. The attention kernels are timed over BLOCK_N × num_warps × num_stages; `pruned_configs` keeps the
configs whose tiles fit a token split, whose shared memory fits the GPU, and whose resident tiles fit a per-thread
budget below which ptxas allocates them without spilling registers (`TILE_BUDGET`, measured). `kernels/aot.py`
compiles the kept configs ahead of time for Hopper (sm_90) without a GPU and reads what each binary needs;
`python bench/aot_table.py` prints it, and tests/kernels/test_aot.py asserts no spills for fp16 and bf16.

Triton versions: 3.6 (the one beside torch 2.11) and 3.9 are checked: the interpreter tests pass and every kept
fp16/bf16 config compiles for sm_90 without spills under both. Triton 3.6's interpreter needs NumPy < 2.4 (it
turns one-element arrays into loop bounds with int(), which NumPy 2.4 refuses); compiled kernels do not care.

torch.compile: the step is a `torch.library.custom_op` (forward and backward each one opaque op with a fake
implementation), and `register_autograd` is its `torch.autograd.Function`, so Dynamo traces the caller with
no graph break and AOTAutograd sees the backward as one op too.
"""
import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_SLOTS = 64
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _mma(a, b, acc, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr):
    """acc + a @ b with operands rounded to DOT_DTYPE and fp32 accumulation.

    The interpreter multiplies bfloat16 blocks as their raw 16-bit integers; UPCAST_OPERANDS (interpreter and
    bfloat16 only) rounds to DOT_DTYPE first and multiplies in fp32, which gives the tensor-core result: the
    products of two bf16 values are exact in fp32.
    """
    a = a.to(DOT_DTYPE)
    b = b.to(DOT_DTYPE)
    if UPCAST_OPERANDS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _slot_attention_fwd_kernel(
    Q_ptr,  # (B, S, D) projected queries, unscaled
    K_ptr,  # (B, N, D)
    V_ptr,  # (B, N, D)
    ATTN_ptr,  # (B, S, N) out: a0, softmax over slots
    MASS_ptr,  # (B, SPLITS, S) out, fp32: Σ_{n in split} a0_sn
    ACC_ptr,  # (B, SPLITS, S, D) out, fp32: Σ_{n in split} a0_sn v_n
    S,
    N,
    TOKENS_PER_SPLIT,
    scale,
    D: tl.constexpr,
    S_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D)
    slot_mask = offs_s < S
    q_ptrs = Q_ptr + batch * S * D + offs_s[:, None] * D + offs_d[None, :]
    q = tl.load(q_ptrs, mask=slot_mask[:, None], other=0.0)  # (S_PAD, D)
    # exp2 instead of exp: fold log2(e) into the logit scale once.
    scale_log2 = scale * 1.4426950408889634

    # fp32 accumulators: the mass is a sum over up to N = 4096 tokens of values in [0, 1]; in fp16 it would
    # lose ~3 digits.
    mass = tl.zeros([S_PAD], dtype=tl.float32)
    acc = tl.zeros([S_PAD, D], dtype=tl.float32)
    n_begin = split * TOKENS_PER_SPLIT
    n_end = tl.minimum(n_begin + TOKENS_PER_SPLIT, N)
    for n_start in range(n_begin, n_end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        token_mask = offs_n < n_end
        kv_offs = batch * N * D + offs_n[:, None] * D + offs_d[None, :]
        k = tl.load(K_ptr + kv_offs, mask=token_mask[:, None], other=0.0)  # (BLOCK_N, D)
        v = tl.load(V_ptr + kv_offs, mask=token_mask[:, None], other=0.0)  # (BLOCK_N, D)

        logits = _mma(q, tl.trans(k), tl.zeros([S_PAD, BLOCK_N], dtype=tl.float32), DOT_DTYPE, INPUT_PRECISION,
                      UPCAST_OPERANDS) * scale_log2  # (S_PAD, BLOCK_N), log2 units
        logits = tl.where(slot_mask[:, None], logits, float("-inf"))
        # The softmax is over slots, axis 0 of the tile, and all slots are in the tile: complete in one pass.
        p = tl.exp2(logits - tl.max(logits, axis=0)[None, :])
        a0 = p / tl.sum(p, axis=0)[None, :]
        # Padded tokens (k = 0) got a uniform softmax; zero them before they enter the mass.
        a0 = tl.where(token_mask[None, :], a0, 0.0)
        attn_ptrs = ATTN_ptr + batch * S * N + offs_s[:, None] * N + offs_n[None, :]
        tl.store(attn_ptrs, a0.to(ATTN_ptr.dtype.element_ty), mask=slot_mask[:, None] & token_mask[None, :])

        mass += tl.sum(a0, axis=1)
        acc = _mma(a0, v, acc, DOT_DTYPE, INPUT_PRECISION, UPCAST_OPERANDS)  # (S_PAD, D)

    row = batch * splits + split  # this program's row of the partial buffers
    tl.store(MASS_ptr + row * S + offs_s, mass, mask=slot_mask)
    tl.store(ACC_ptr + row * S * D + offs_s[:, None] * D + offs_d[None, :], acc, mask=slot_mask[:, None])


@triton.jit
def _slot_attention_bwd_kernel(
    Q_ptr,  # (B, S, D)
    K_ptr,  # (B, N, D)
    V_ptr,  # (B, N, D)
    ATTN_ptr,  # (B, S, N) a0 saved by the forward
    DATTN_ptr,  # (B, S, N) ∂L/∂a0; not read unless HAS_DATTN
    U_ptr,  # (B, S, D) fp32, u saved by the forward
    MASS_ptr,  # (B, S) fp32, c saved by the forward
    DU_ptr,  # (B, S, D) ∂L/∂u from the GRU backward
    DQ_ptr,  # (B, SPLITS, S, D) out, fp32: this split's Σ_n dlogit_sn k_n · scale
    DK_ptr,  # (B, N, D) out
    DV_ptr,  # (B, N, D) out
    S,
    N,
    TOKENS_PER_SPLIT,
    scale,
    eps,
    D: tl.constexpr,
    S_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DATTN: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D)
    slot_mask = offs_s < S
    sd_offs = batch * S * D + offs_s[:, None] * D + offs_d[None, :]
    q = tl.load(Q_ptr + sd_offs, mask=slot_mask[:, None], other=0.0)  # (S_PAD, D)
    du = tl.load(DU_ptr + sd_offs, mask=slot_mask[:, None], other=0.0).to(tl.float32)  # (S_PAD, D)
    u = tl.load(U_ptr + sd_offs, mask=slot_mask[:, None], other=0.0)  # (S_PAD, D) fp32
    mass = tl.load(MASS_ptr + batch * S + offs_s, mask=slot_mask, other=0.0)
    inv_mass = 1.0 / (mass + eps)  # (S_PAD,)
    # du·u in fp32 from the fp32 u: dA0 subtracts it from du·v_n, and the two nearly cancel when a slot's
    # values are alike.
    du_dot_u = tl.sum(du * u, axis=1)  # (S_PAD,)

    dq = tl.zeros([S_PAD, D], dtype=tl.float32)
    n_begin = split * TOKENS_PER_SPLIT
    n_end = tl.minimum(n_begin + TOKENS_PER_SPLIT, N)
    for n_start in range(n_begin, n_end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        token_mask = offs_n < n_end
        kv_offs = batch * N * D + offs_n[:, None] * D + offs_d[None, :]
        k = tl.load(K_ptr + kv_offs, mask=token_mask[:, None], other=0.0)  # (BLOCK_N, D)
        v = tl.load(V_ptr + kv_offs, mask=token_mask[:, None], other=0.0)  # (BLOCK_N, D)
        sn_offs = batch * S * N + offs_s[:, None] * N + offs_n[None, :]
        sn_mask = slot_mask[:, None] & token_mask[None, :]
        a0 = tl.load(ATTN_ptr + sn_offs, mask=sn_mask, other=0.0).to(tl.float32)  # (S_PAD, BLOCK_N)

        a = a0 * inv_mass[:, None]
        dv = _mma(tl.trans(a), du, tl.zeros([BLOCK_N, D], dtype=tl.float32), DOT_DTYPE, INPUT_PRECISION,
                  UPCAST_OPERANDS)  # (BLOCK_N, D)
        tl.store(DV_ptr + kv_offs, dv.to(DV_ptr.dtype.element_ty), mask=token_mask[:, None])

        du_dot_v = _mma(du, tl.trans(v), tl.zeros([S_PAD, BLOCK_N], dtype=tl.float32), DOT_DTYPE, INPUT_PRECISION,
                        UPCAST_OPERANDS)  # (S_PAD, BLOCK_N)
        da0 = (du_dot_v - du_dot_u[:, None]) * inv_mass[:, None]
        if HAS_DATTN:
            da0 += tl.load(DATTN_ptr + sn_offs, mask=sn_mask, other=0.0).to(tl.float32)
        # Softmax backward over slots; padded slots and tokens have a0 = 0 and drop out.
        dlogit = a0 * (da0 - tl.sum(a0 * da0, axis=0)[None, :])  # (S_PAD, BLOCK_N)

        dk = _mma(tl.trans(dlogit), q, tl.zeros([BLOCK_N, D], dtype=tl.float32), DOT_DTYPE, INPUT_PRECISION,
                  UPCAST_OPERANDS) * scale  # (BLOCK_N, D)
        tl.store(DK_ptr + kv_offs, dk.to(DK_ptr.dtype.element_ty), mask=token_mask[:, None])
        dq = _mma(dlogit, k, dq, DOT_DTYPE, INPUT_PRECISION, UPCAST_OPERANDS)  # (S_PAD, D)

    row = batch * splits + split
    tl.store(DQ_ptr + row * S * D + offs_s[:, None] * D + offs_d[None, :], dq * scale, mask=slot_mask[:, None])


@triton.jit
def _tanh(x):
    # tl has no tanh; 2σ(2x) − 1 is within ~1e-7 absolute of it and saturates correctly.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _gru_fwd_kernel(
    GI_ptr,  # (M, 3D) u W_ihᵀ + b_ih, gates [r; z; n]
    GH_ptr,  # (M, 3D) hidden W_hhᵀ + b_hh
    X_ptr,  # (M, D) hidden state
    Y_ptr,  # (M, D) out: new slots, in the hidden state's dtype
    numel,  # M · D
    D,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    gate = (offs // D) * 3 * D + offs % D  # offset of the r gate of this element in a (M, 3D) row
    # Gate math in fp32 whatever the storage dtype.
    i_r = tl.load(GI_ptr + gate, mask=mask, other=0.0).to(tl.float32)
    i_z = tl.load(GI_ptr + gate + D, mask=mask, other=0.0).to(tl.float32)
    i_n = tl.load(GI_ptr + gate + 2 * D, mask=mask, other=0.0).to(tl.float32)
    h_r = tl.load(GH_ptr + gate, mask=mask, other=0.0).to(tl.float32)
    h_z = tl.load(GH_ptr + gate + D, mask=mask, other=0.0).to(tl.float32)
    h_n = tl.load(GH_ptr + gate + 2 * D, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.sigmoid(i_r + h_r)
    z = tl.sigmoid(i_z + h_z)
    n = _tanh(i_n + r * h_n)
    y = n + z * (x - n)  # = (1 − z) n + z x
    tl.store(Y_ptr + offs, y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gru_bwd_kernel(
    DY_ptr,  # (M, D) ∂L/∂slots
    GI_ptr,  # (M, 3D) saved gate pre-activations, input side
    GH_ptr,  # (M, 3D) saved gate pre-activations, hidden side
    X_ptr,  # (M, D) hidden state
    DGI_ptr,  # (M, 3D) out: ∂L/∂gi
    DGH_ptr,  # (M, 3D) out: ∂L/∂gh
    DX_ptr,  # (M, D) out, fp32: the direct term dy·z of ∂L/∂hidden (the GEMM term is added on the host)
    numel,  # M · D
    D,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    gate = (offs // D) * 3 * D + offs % D
    i_r = tl.load(GI_ptr + gate, mask=mask, other=0.0).to(tl.float32)
    i_z = tl.load(GI_ptr + gate + D, mask=mask, other=0.0).to(tl.float32)
    i_n = tl.load(GI_ptr + gate + 2 * D, mask=mask, other=0.0).to(tl.float32)
    h_r = tl.load(GH_ptr + gate, mask=mask, other=0.0).to(tl.float32)
    h_z = tl.load(GH_ptr + gate + D, mask=mask, other=0.0).to(tl.float32)
    h_n = tl.load(GH_ptr + gate + 2 * D, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Recompute the gates (cheaper than saving r, z, n: three loads of gi/gh we need anyway).
    r = tl.sigmoid(i_r + h_r)
    z = tl.sigmoid(i_z + h_z)
    n = _tanh(i_n + r * h_n)

    dg_n = dy * (1.0 - z) * (1.0 - n * n)
    dg_r = dg_n * h_n * r * (1.0 - r)
    dg_z = dy * (x - n) * z * (1.0 - z)
    out_ty = DGI_ptr.dtype.element_ty
    tl.store(DGI_ptr + gate, dg_r.to(out_ty), mask=mask)
    tl.store(DGI_ptr + gate + D, dg_z.to(out_ty), mask=mask)
    tl.store(DGI_ptr + gate + 2 * D, dg_n.to(out_ty), mask=mask)
    tl.store(DGH_ptr + gate, dg_r.to(out_ty), mask=mask)
    tl.store(DGH_ptr + gate + D, dg_z.to(out_ty), mask=mask)
    tl.store(DGH_ptr + gate + 2 * D, (dg_n * r).to(out_ty), mask=mask)
    tl.store(DX_ptr + offs, dy * z, mask=mask)


# ------------------------------------------------------------------------------------------ autotune configs


def _attention_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)
        for block_n in (16, 32, 64, 128)
        for num_warps in (4, 8)
        for num_stages in (2, 3)
    ]


# Shared memory per block: Hopper (H100, H200) 227 KiB of its 228 KiB per SM; A100 163 KiB.
HOPPER_SHARED = 227 * 1024

# Under the interpreter there is no timer to tune with: one config, 32-token tiles, so the tests see several tiles
# per split and masked tails. (A single config is never benchmarked, by any Triton version.)
INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2)


# Elements of the resident (S_PAD + BLOCK_N) × D tiles per thread up to which a config compiles without register
# spills on sm_90, per kernel and operand width (bytes). The forward keeps q and the (S, D) fp32 accumulator
# resident, the backward q, du, dq and the dk, dv tiles, hence its lower budget; fp32 operands take about twice
# the registers. Measured with `kernels/aot.py` at D = 256: 16-bit backward configs at 96 elements spill 8 bytes
# per thread, at 128 up to 1 KiB; float32 at 64 spills up to 6 KiB (forward) and at 48 64 bytes (backward).
# tests/kernels/test_aot.py compiles every config kept for fp16 and bf16 at the paper's shapes and fails on a spill.
TILE_BUDGET = {("fwd", 2): 192, ("bwd", 2): 80, ("fwd", 4): 48, ("bwd", 4): 32}


def tile_elements_per_thread(config: triton.Config, s_pad: int, dim: int) -> float:
    return (s_pad + config.kwargs["BLOCK_N"]) * dim / (32 * config.num_warps)


def shared_bytes_bound(config: triton.Config, s_pad: int, dim: int, element_bytes: int) -> int:
    """An upper bound of the shared memory per block: the k and v tiles of every pipeline stage plus two
    (S_PAD, D) tiles (measured at the paper's shapes: at most 100 % of it, `tests/kernels/test_aot.py`)."""
    return (config.num_stages * 2 * config.kwargs["BLOCK_N"] + 2 * s_pad) * dim * element_bytes


def pruned_configs(arguments: dict, backward: bool = False, shared_limit: int = HOPPER_SHARED) -> list[triton.Config]:
    """The autotune configs worth timing for one launch of the attention kernels (`arguments`: its launch
    arguments by name, constexprs included; `shared_limit`: the GPU's shared memory per block):

    * tiles no longer than a token split (a longer tile only computes masked tokens);
    * 3 pipeline stages only where the token loop runs at least 3 tiles (with 1 or 2 there is nothing more to
      overlap than with 2 stages);
    * shared memory within the limit (`shared_bytes_bound`);
    * resident tiles within `TILE_BUDGET`, so the binary spills no registers; if no config is within it (float32
      with many slots), the one with the fewest resident elements.
    """
    tokens, s_pad, dim = arguments["TOKENS_PER_SPLIT"], arguments["S_PAD"], arguments["D"]
    element_bytes = 4 if arguments["DOT_DTYPE"] == tl.float32 else 2
    longest = max(16, triton.next_power_of_2(tokens))
    budget = TILE_BUDGET[("bwd" if backward else "fwd", element_bytes)]
    candidates = [
        c for c in _attention_configs()
        if c.kwargs["BLOCK_N"] <= longest and (c.num_stages <= 2 or tokens >= 3 * c.kwargs["BLOCK_N"])
        and shared_bytes_bound(c, s_pad, dim, element_bytes) <= shared_limit
    ]  # fmt: skip
    kept = [c for c in candidates if tile_elements_per_thread(c, s_pad, dim) <= budget]
    return kept or [min(candidates, key=lambda c: (tile_elements_per_thread(c, s_pad, dim), c.num_stages))]


def _prune(backward: bool):
    def prune(configs, named_args, **kwargs):
        device = triton.runtime.driver.active.get_current_device()
        shared_limit = triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]
        return pruned_configs({**named_args, **kwargs}, backward, shared_limit)  # positional and keyword arguments

    return prune


def _autotuned(kernel, key: list[str], backward: bool):
    if INTERPRET:
        return triton.autotune(configs=[INTERPRETER_CONFIG], key=key)(kernel)
    return triton.autotune(
        configs=_attention_configs(), key=key, prune_configs_by={"early_config_prune": _prune(backward)}
    )(kernel)


ATTENTION_FWD_KEY = ["S_PAD", "D", "TOKENS_PER_SPLIT", "DOT_DTYPE"]
ATTENTION_BWD_KEY = ["S_PAD", "D", "TOKENS_PER_SPLIT", "DOT_DTYPE", "HAS_DATTN"]
_slot_attention_fwd = _autotuned(_slot_attention_fwd_kernel, ATTENTION_FWD_KEY, backward=False)
_slot_attention_bwd = _autotuned(_slot_attention_bwd_kernel, ATTENTION_BWD_KEY, backward=True)

# The GRU kernels are elementwise and memory-bound; one block size serves every shape.
GRU_BLOCK = 1024
GRU_WARPS = 4
GRU_STAGES = 3  # Triton's default; nothing to pipeline


# -------------------------------------------------------------------------------------------- host functions


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer a kernel writes is allocated here (the tests fill them with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # Interpreter: pretend to have 4 SMs so small test batches exercise the token split.
    return 4


def _num_token_splits(batch: int, tokens: int, sms: int) -> int:
    """Programs per batch element: enough for ~2 programs per SM, but no split shorter than 64 tokens."""
    wanted = triton.cdiv(2 * sms, batch)
    return max(1, min(wanted, triton.cdiv(tokens, 64)))


def token_split(batch: int, tokens: int, sms: int) -> tuple[int, int]:
    """(splits, tokens per split) of the attention kernels' grid (B, splits) on a GPU with `sms` SMs."""
    splits = _num_token_splits(batch, tokens, sms)
    tokens_per_split = triton.cdiv(tokens, splits)
    return triton.cdiv(tokens, tokens_per_split), tokens_per_split  # no empty trailing split


def _dot_args(dtype: torch.dtype) -> dict:
    return {
        "DOT_DTYPE": TL_DTYPES[dtype],
        # IEEE fp32 dots for float32: TF32 would cost ~3 digits against PyTorch's default fp32 matmul.
        # (Only fp32 operands read this; fp16/bf16 always take the tensor cores.)
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST_OPERANDS": INTERPRET and dtype == torch.bfloat16,
    }


def _attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Launches the forward attention kernel. Returns a0 (B, S, N) in q's dtype, c (B, S) and u (B, S, D) fp32."""
    batch, slots, dim = q.shape
    tokens = k.shape[1]
    splits, tokens_per_split = token_split(batch, tokens, _num_sms(q.device))
    attn = _empty((batch, slots, tokens), q.dtype, q.device)
    mass_partial = _empty((batch, splits, slots), torch.float32, q.device)
    acc_partial = _empty((batch, splits, slots, dim), torch.float32, q.device)
    _slot_attention_fwd[(batch, splits)](
        q, k, v, attn, mass_partial, acc_partial,
        slots, tokens, tokens_per_split, scale,
        D=dim, S_PAD=max(16, triton.next_power_of_2(slots)), **_dot_args(q.dtype),
    )  # fmt: skip
    # Deterministic second pass over the splits; the division by c + eps happens once, here.
    mass = mass_partial.sum(dim=1)  # (B, S)
    updates = acc_partial.sum(dim=1).div_(mass.unsqueeze(-1) + eps)  # (B, S, D)
    return attn, mass, updates


def _gru_forward(gates_i: Tensor, gates_h: Tensor, hidden: Tensor) -> Tensor:
    slots = _empty(hidden.shape, hidden.dtype, hidden.device)
    numel = hidden.numel()
    _gru_fwd_kernel[(triton.cdiv(numel, GRU_BLOCK),)](
        gates_i, gates_h, hidden, slots, numel, hidden.shape[-1], BLOCK=GRU_BLOCK, num_warps=GRU_WARPS
    )
    return slots


def _gru_backward(dslots: Tensor, gates_i: Tensor, gates_h: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d_gates_i = _empty(gates_i.shape, gates_i.dtype, gates_i.device)
    d_gates_h = _empty(gates_h.shape, gates_h.dtype, gates_h.device)
    dhidden_direct = _empty(hidden.shape, torch.float32, hidden.device)
    numel = hidden.numel()
    _gru_bwd_kernel[(triton.cdiv(numel, GRU_BLOCK),)](
        dslots, gates_i, gates_h, hidden, d_gates_i, d_gates_h, dhidden_direct, numel, hidden.shape[-1],
        BLOCK=GRU_BLOCK, num_warps=GRU_WARPS,
    )  # fmt: skip
    return d_gates_i, d_gates_h, dhidden_direct


def _attention_backward(
    dupdates: Tensor, dattn: Tensor | None, q: Tensor, k: Tensor, v: Tensor, attn: Tensor, updates: Tensor,
    mass: Tensor, scale: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    batch, slots, dim = q.shape
    tokens = k.shape[1]
    splits, tokens_per_split = token_split(batch, tokens, _num_sms(q.device))
    dq_partial = _empty((batch, splits, slots, dim), torch.float32, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    _slot_attention_bwd[(batch, splits)](
        q, k, v, attn, attn if dattn is None else dattn, updates, mass, dupdates, dq_partial, dk, dv,
        slots, tokens, tokens_per_split, scale, eps,
        D=dim, S_PAD=max(16, triton.next_power_of_2(slots)), HAS_DATTN=dattn is not None, **_dot_args(q.dtype),
    )  # fmt: skip
    dq = dq_partial.sum(dim=1).to(q.dtype)  # deterministic sum over the token splits
    return dq, dk, dv


# ---------------------------------------------------------------------------------- custom ops and autograd


@torch.library.custom_op("smoothsa::slot_attention_step", mutates_args=())
def _slot_attention_step_op(
    q: Tensor, k: Tensor, v: Tensor, hidden: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
    bias_hh: Tensor, scale: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Forward. q, k, v and the GRU parameters share one dtype; hidden may be wider (autocast).

    Returns slots (B, S, D) in hidden's dtype, a0 (B, S, N) and, for the backward, u (B, S, D) fp32,
    c (B, S) fp32, gi and gh (B·S, 3D).
    """
    q, k, v, hidden = q.contiguous(), k.contiguous(), v.contiguous(), hidden.contiguous()
    batch, slots, dim = q.shape
    with torch.autocast(q.device.type, enabled=False):  # the casts below are the whole policy
        attn, mass, updates = _attention_forward(q, k, v, scale, eps)
        # cuBLAS gate GEMMs with the bias folded in: operands in the parameters' dtype, fp32 accumulation.
        gates_i = torch.addmm(bias_ih, updates.view(batch * slots, dim).to(q.dtype), weight_ih.t())  # (B·S, 3D)
        gates_h = torch.addmm(bias_hh, hidden.view(batch * slots, dim).to(q.dtype), weight_hh.t())  # (B·S, 3D)
        new_slots = _gru_forward(gates_i, gates_h, hidden)
    return new_slots, attn, updates, mass, gates_i, gates_h


@_slot_attention_step_op.register_fake
def _(q, k, v, hidden, weight_ih, weight_hh, bias_ih, bias_hh, scale, eps):
    batch, slots, dim = q.shape
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format),
        q.new_empty(batch, slots, k.shape[1]),
        q.new_empty(batch, slots, dim, dtype=torch.float32),
        q.new_empty(batch, slots, dtype=torch.float32),
        q.new_empty(batch * slots, 3 * dim),
        q.new_empty(batch * slots, 3 * dim),
    )


@torch.library.custom_op("smoothsa::slot_attention_step_backward", mutates_args=())
def _slot_attention_step_backward_op(
    dslots: Tensor, dattn: Tensor | None, q: Tensor, k: Tensor, v: Tensor, hidden: Tensor, weight_ih: Tensor,
    weight_hh: Tensor, attn: Tensor, updates: Tensor, mass: Tensor, gates_i: Tensor, gates_h: Tensor,
    scale: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Backward. Returns dq, dk, dv, dhidden, dW_ih, dW_hh, db_ih, db_hh."""
    dslots = dslots.contiguous()
    dattn = None if dattn is None else dattn.contiguous()
    q, k, v, hidden = q.contiguous(), k.contiguous(), v.contiguous(), hidden.contiguous()
    batch, slots, dim = q.shape
    with torch.autocast(q.device.type, enabled=False):
        d_gates_i, d_gates_h, dhidden_direct = _gru_backward(dslots, gates_i, gates_h, hidden)
        dupdates = torch.mm(d_gates_i, weight_ih).view(batch, slots, dim)  # (B, S, D)
        # The GEMM term in the parameters' dtype, the sum with the direct term in fp32.
        dhidden = torch.mm(d_gates_h, weight_hh).float().add_(dhidden_direct.view(-1, dim))
        dhidden = dhidden.view(batch, slots, dim).to(hidden.dtype)
        dweight_ih = torch.mm(d_gates_i.t(), updates.view(-1, dim).to(q.dtype))  # (3D, D)
        dweight_hh = torch.mm(d_gates_h.t(), hidden.view(-1, dim).to(q.dtype))  # (3D, D)
        dbias_ih = d_gates_i.sum(dim=0, dtype=torch.float32).to(q.dtype)
        dbias_hh = d_gates_h.sum(dim=0, dtype=torch.float32).to(q.dtype)
        dq, dk, dv = _attention_backward(dupdates, dattn, q, k, v, attn, updates, mass, scale, eps)
    return dq, dk, dv, dhidden, dweight_ih, dweight_hh, dbias_ih, dbias_hh


@_slot_attention_step_backward_op.register_fake
def _(dslots, dattn, q, k, v, hidden, weight_ih, weight_hh, attn, updates, mass, gates_i, gates_h, scale, eps):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        torch.empty_like(hidden, memory_format=torch.contiguous_format),
        q.new_empty(weight_ih.shape),
        q.new_empty(weight_hh.shape),
        q.new_empty(weight_ih.shape[0]),
        q.new_empty(weight_hh.shape[0]),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, hidden, weight_ih, weight_hh, _, _, scale, eps = inputs
    _, attn, updates, mass, gates_i, gates_h = output
    ctx.save_for_backward(q, k, v, hidden, weight_ih, weight_hh, attn, updates, mass, gates_i, gates_h)
    ctx.scale, ctx.eps = scale, eps
    ctx.mark_non_differentiable(updates, mass, gates_i, gates_h)  # saved intermediates, not results
    ctx.set_materialize_grads(False)  # an unused attention map arrives as None, not as a tensor of zeros


def _backward(ctx, dslots, dattn, *_):
    q, k, v, hidden, weight_ih, weight_hh, attn, updates, mass, gates_i, gates_h = ctx.saved_tensors
    if dslots is None:  # only the attention map was used
        dslots = torch.zeros_like(hidden)
    grads = _slot_attention_step_backward_op(
        dslots, dattn, q, k, v, hidden, weight_ih, weight_hh, attn, updates, mass, gates_i, gates_h,
        ctx.scale, ctx.eps,
    )  # fmt: skip
    return (*grads, None, None)


_slot_attention_step_op.register_autograd(_backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------------------------- public


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def _unsupported(device: torch.device, dtype: torch.dtype, slots: int, dim: int, tokens: int) -> str | None:
    if device.type == "cpu" and not INTERPRET:
        return "CPU tensors without TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda"):
        return f"{device.type} tensors"
    if dtype == torch.float64:
        return "float64"
    if dtype not in SUPPORTED_DTYPES:
        return f"{dtype}"
    if slots > MAX_SLOTS:
        return f"S > {MAX_SLOTS}"
    if dim < 16 or dim > 512 or dim & (dim - 1):
        return f"D = {dim} is not a power of two in [16, 512]"
    if slots < 1 or tokens < 1:
        return "empty slots or tokens"
    return None


def fused_step_supported(input: Tensor, query: Tensor) -> str | None:
    """Whether `fused_slot_attention_step` can run for SlotAttention's `input` (B, N, Dv) and `query` (B, S, D).

    Returns None when it can, otherwise a short reason ("float64", "S > 64", ...). Decided on the dtype the
    step will compute in (the autocast dtype under autocast).
    """
    return _unsupported(query.device, _compute_dtype(query), query.shape[1], query.shape[2], input.shape[1])


def fused_slot_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    hidden: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor,
    bias_hh: Tensor,
    scale: float,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Fused twin of `smoothsa.kernels.reference.slot_attention_step` (same arguments, same results).

    Cast policy: q, k, v and the GRU parameters are cast to the compute dtype (the autocast dtype under
    autocast, else q's dtype); hidden keeps its dtype, and the returned slots have it. The attention map is in
    the compute dtype. Gradients flow back through the casts to each input's own dtype.

    Shapes:
        q, hidden: (B, S, D); k, v: (B, N, D); weight_*: (3D, D); bias_*: (3D,).
        Returns slots (B, S, D) and a0 (B, S, N).
    """
    if q.dim() != 3 or hidden.shape != q.shape or k.dim() != 3 or v.shape != k.shape or k.shape[::2] != q.shape[::2]:
        raise ValueError(
            "fused_slot_attention_step: expected q, hidden (B, S, D) and k, v (B, N, D), got "
            f"q {tuple(q.shape)}, hidden {tuple(hidden.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    dtype = _compute_dtype(q)
    reason = _unsupported(q.device, dtype, q.shape[1], q.shape[2], k.shape[1])
    if reason is not None:
        raise ValueError(f"fused_slot_attention_step: unsupported input ({reason}); use the reference step")
    q, k, v, weight_ih, weight_hh, bias_ih, bias_hh = (
        t.to(dtype) for t in (q, k, v, weight_ih, weight_hh, bias_ih, bias_hh)
    )
    slots, attn, *_ = _slot_attention_step_op(q, k, v, hidden, weight_ih, weight_hh, bias_ih, bias_hh, scale, eps)
    return slots, attn

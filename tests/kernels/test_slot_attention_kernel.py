"""The fused slot-attention step (`kernels/slot_attention.py`) against the float64 reference.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with one, the same tests run compiled on CUDA, plus the `cuda`-marked tests at the
paper's shapes. Every output and every gradient is checked; every buffer a kernel writes starts as NaN.
"""
import subprocess
import sys

import pytest
import torch

from smoothsa.kernels import fused_slot_attention_step, fused_step_supported, slot_attention_step
from smoothsa.kernels import slot_attention as fused_module
from smoothsa.slot_attention import SlotAttention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STEP_INPUTS = ("q", "k", "v", "hidden", "weight_ih", "weight_hh", "bias_ih", "bias_hh")
# Per dtype: the allowed error as a fraction of the tensor's largest reference value, elementwise
# |fused − ref| ≤ tol · max|ref| + tol · |ref|. Measured worst cases under the interpreter over the shapes below:
# fp32 6e-7, fp16 1e-3, bf16 1.6e-2 (dv: a sum over S slots of bf16-rounded products).
TOLERANCES = {torch.float32: 5e-6, torch.float16: 5e-3, torch.bfloat16: 4e-2}
cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every buffer the fused path hands to a kernel starts as NaN, so an element a kernel skips fails."""

    def empty_nan(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(fused_module, "_empty", empty_nan)


def _step_inputs(batch, slots, tokens, dim, dtype, seed=0) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(device=DEVICE, dtype=dtype)

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


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> float:
    """Checks actual against the float64 expected; returns the error as a fraction of max|expected|."""
    assert actual.shape == expected.shape, name
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten output element?)"
    magnitude = expected.abs().max().item() or 1.0  # exactly-zero gradients (q, k with one slot)
    torch.testing.assert_close(
        actual.double(), expected, atol=tol * magnitude, rtol=tol, msg=lambda message: f"{name}: {message}"
    )
    return (actual.double() - expected).abs().max().item() / magnitude


def _check_step(batch, slots, tokens, dim, dtype, loss="both", seed=0) -> float:
    """Runs the fused step and the float64 reference on the same values; compares outputs and all gradients."""
    inputs = _step_inputs(batch, slots, tokens, dim, dtype, seed)
    scale = dim**-0.5
    fused = {name: t.clone().requires_grad_() for name, t in inputs.items()}
    ref = {name: t.double().requires_grad_() for name, t in inputs.items()}
    slots_fused, attn_fused = fused_slot_attention_step(**fused, scale=scale)
    slots_ref, attn_ref = slot_attention_step(**ref, scale=scale)
    assert slots_fused.dtype == dtype and attn_fused.dtype == dtype

    generator = torch.Generator().manual_seed(seed + 1)
    dslots = torch.randn(slots_ref.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    dattn = torch.randn(attn_ref.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    for out_fused, out_ref, grad, used in ((slots_fused, slots_ref, dslots, loss in ("both", "slots")),
                                          (attn_fused, attn_ref, dattn, loss in ("both", "attn"))):  # fmt: skip
        if used:
            (out_fused.double() * grad).sum().backward(retain_graph=True)
            (out_ref * grad).sum().backward(retain_graph=True)

    tol = TOLERANCES[dtype]
    errors = [_assert_close(slots_fused, slots_ref, tol, "slots"), _assert_close(attn_fused, attn_ref, tol, "attn")]
    for name in STEP_INPUTS:
        assert fused[name].grad.dtype == dtype, name
        expected = ref[name].grad if ref[name].grad is not None else torch.zeros_like(ref[name])  # attn-only loss
        errors.append(_assert_close(fused[name].grad, expected, tol, f"grad {name}"))
    return max(errors)


# ---------------------------------------------------------------------------------------------- step level


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("tokens", [256, 197])
@pytest.mark.parametrize("slots", [1, 7, 11, 24])
def test_step_matches_float64_reference(slots, tokens, batch, dtype):
    # D = 32 keeps the interpreter quick; the shapes under test here are S, N and B.
    _check_step(batch, slots, tokens, 32, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch, slots, tokens", [(2, 7, 256), (3, 24, 197), (1, 11, 197)])
def test_step_matches_float64_reference_d256(batch, slots, tokens, dtype):
    _check_step(batch, slots, tokens, 256, dtype)


@pytest.mark.parametrize("batch, slots, tokens, dim", [(2, 64, 67, 16), (1, 3, 33, 512), (3, 2, 1, 16)])
def test_step_edge_shapes(batch, slots, tokens, dim):
    """64 slots (the largest), D = 16 and 512 (the range ends), a single token."""
    _check_step(batch, slots, tokens, dim, torch.float32)


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_step_token_splits(monkeypatch, splits):
    """The per-split partial sums and their host-side reduction, whatever the launch heuristic picks."""
    monkeypatch.setattr(fused_module, "_num_token_splits", lambda batch, tokens, device: splits)
    _check_step(2, 7, 197, 32, torch.float32)


@pytest.mark.parametrize("loss", ["slots", "attn"])
def test_step_one_output_used(loss):
    """Only one output reaches the loss: the other gradient arrives as None (no dattn / zero dslots path)."""
    _check_step(3, 7, 197, 32, torch.float32, loss=loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_step_under_autocast(dtype):
    """Cast policy: q, k, v and GRU parameters in the autocast dtype; hidden and slots keep float32."""
    inputs = _step_inputs(2, 7, 197, 32, torch.float32)
    fused = {name: t.clone().requires_grad_() for name, t in inputs.items()}
    ref = {name: t.double().requires_grad_() for name, t in inputs.items()}
    with torch.autocast(DEVICE.type, dtype=dtype):
        slots_fused, attn_fused = fused_slot_attention_step(**fused, scale=32**-0.5)
    slots_ref, attn_ref = slot_attention_step(**ref, scale=32**-0.5)
    assert slots_fused.dtype == torch.float32 and attn_fused.dtype == dtype
    (slots_fused.double() * slots_ref.detach()).sum().backward()
    (slots_ref * slots_ref.detach()).sum().backward()
    tol = TOLERANCES[dtype]
    _assert_close(slots_fused, slots_ref, tol, "slots")
    _assert_close(attn_fused, attn_ref, tol, "attn")
    for name in STEP_INPUTS:
        assert fused[name].grad.dtype == torch.float32, name
        _assert_close(fused[name].grad, ref[name].grad, tol, f"grad {name}")


def test_step_is_deterministic():
    inputs = {name: t.requires_grad_() for name, t in _step_inputs(5, 11, 197, 32, torch.float32).items()}
    runs = []
    for _ in range(2):
        slots, attn = fused_slot_attention_step(**inputs, scale=0.25)
        grads = torch.autograd.grad((slots.sum() + attn.square().sum()), list(inputs.values()))
        runs.append((slots, attn, *grads))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_supported_reasons(monkeypatch):
    input = torch.randn(2, 10, 48, device=DEVICE)
    assert fused_step_supported(input, torch.randn(2, 7, 32, device=DEVICE)) is None
    assert fused_step_supported(input.double(), torch.randn(2, 7, 32, device=DEVICE).double()) == "float64"
    assert fused_step_supported(input, torch.randn(2, 65, 32, device=DEVICE)) == "S > 64"
    assert "power of two" in fused_step_supported(input, torch.randn(2, 7, 100, device=DEVICE))
    assert "power of two" in fused_step_supported(input, torch.randn(2, 7, 1024, device=DEVICE))
    with pytest.raises(ValueError, match="S > 64"):
        fused_slot_attention_step(**_step_inputs(1, 65, 5, 16, torch.float32), scale=0.25)
    monkeypatch.setattr(fused_module, "INTERPRET", False)
    assert fused_step_supported(input.cpu(), torch.randn(2, 7, 32)) == "CPU tensors without TRITON_INTERPRET=1"


def test_package_imports_without_triton():
    """triton is optional: `smoothsa.kernels` imports without it and the fused path reports why it cannot run."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail and find_spec return None
        "import torch, smoothsa.kernels as kernels\n"
        "print(kernels.fused_step_supported(torch.randn(1, 5, 8), torch.randn(1, 3, 16)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "triton not installed"


# -------------------------------------------------------------------------------------------- module level


def _module_pair(trunc_bp, **dims):
    torch.manual_seed(0)
    fused = SlotAttention(trunc_bp=trunc_bp, fused=True, **dims).to(DEVICE)
    with torch.no_grad():  # move every parameter off its init (LayerNorm 1/0, zero biases)
        for param in fused.parameters():
            param.add_(0.1 * torch.randn_like(param))
    reference = SlotAttention(trunc_bp=trunc_bp, fused=False, **dims).to(DEVICE).double()
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def _module_grads(module, input, query, num_iter, upstream):
    input = input.clone().requires_grad_()
    query = query.clone().requires_grad_()
    slots, attn = module(input, query, num_iter=num_iter)
    (slots * upstream[0]).sum().add((attn * upstream[1]).sum()).backward()
    grads = {"input": input.grad, "query": query.grad}
    parameters = getattr(module, "_orig_mod", module).named_parameters()  # unwrap torch.compile
    grads.update({f"param.{name}": p.grad for name, p in parameters})
    return slots, attn, grads


@pytest.mark.parametrize("num_iter", [1, 3])
@pytest.mark.parametrize("trunc_bp", ["bi-level", None])
def test_module_fused_matches_reference(trunc_bp, num_iter):
    dims = {"embed_dim": 64, "ffn_dim": 128, "kv_dim": 48}
    fused, reference = _module_pair(trunc_bp, **dims)
    generator = torch.Generator().manual_seed(1)
    input = torch.randn(3, 197, 48, generator=generator).to(DEVICE)
    query = torch.randn(3, 7, 64, generator=generator).to(DEVICE)
    upstream = tuple(torch.randn(shape, generator=generator).to(DEVICE) for shape in ((3, 7, 64), (3, 7, 197)))
    slots, attn, grads = _module_grads(fused, input, query, num_iter, upstream)
    slots_ref, attn_ref, grads_ref = _module_grads(
        reference, input.double(), query.double(), num_iter, tuple(u.double() for u in upstream)
    )
    tol = TOLERANCES[torch.float32]
    _assert_close(slots, slots_ref, tol, "slots")
    _assert_close(attn, attn_ref, tol, "attn")
    assert grads.keys() == grads_ref.keys() and len(grads) == 19
    for name, grad in grads.items():
        if name == "param.norm1q.bias":  # analytically zero (docs/official.md §2.6 note iii): compare absolutely
            assert grad.abs().max() < 1e-5
            continue
        _assert_close(grad, grads_ref[name], tol, name)


GOLDEN_VARIANTS = [("bi-level", None, "slots", "attent", "grads"),
                   (None, None, "slots", "attent", "grads_trunc_none"),
                   ("bi-level", 1, "slots_iter1", "attent_iter1", "grads_iter1")]  # fmt: skip


@pytest.mark.parametrize("trunc_bp, num_iter, slots_key, attn_key, grads_key", GOLDEN_VARIANTS)
def test_module_fused_reproduces_golden(golden, trunc_bp, num_iter, slots_key, attn_key, grads_key):
    """The official module's float64 outputs and all 19 gradients, from the fused path in float32."""
    data = golden("sa")
    module = SlotAttention(trunc_bp=trunc_bp, fused=True).to(DEVICE)
    module.load_state_dict(data["state_dict"])
    input = data["input"].to(DEVICE, copy=True).requires_grad_()  # the fixture's tensors are shared
    query = data["query"].to(DEVICE, copy=True).requires_grad_()
    slots, attn = module(input, query, num_iter=num_iter)
    (slots.double() * data["R"].to(DEVICE)).sum().backward()

    torch.testing.assert_close(slots.double().cpu(), data[slots_key], atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(attn.double().cpu(), data[attn_key], atol=5e-6, rtol=1e-4)
    grads = {"input": input.grad, "query": query.grad}
    grads.update({f"param.{name}": p.grad for name, p in module.named_parameters()})
    assert grads.keys() == data[grads_key].keys() and len(grads) == 19
    for name, expected in data[grads_key].items():
        torch.testing.assert_close(
            grads[name].double().cpu(), expected, atol=5e-5, rtol=1e-4, msg=lambda message: f"{name}: {message}"
        )


def test_module_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) fails on any graph break; the compiled forward and backward match eager."""
    fused, _ = _module_pair("bi-level", embed_dim=32, ffn_dim=64, kv_dim=16)
    generator = torch.Generator().manual_seed(2)
    input = torch.randn(2, 37, 16, generator=generator).to(DEVICE)
    query = torch.randn(2, 5, 32, generator=generator).to(DEVICE)
    upstream = tuple(torch.randn(shape, generator=generator).to(DEVICE) for shape in ((2, 5, 32), (2, 5, 37)))
    # Inductor cannot compile kernels the interpreter runs; aot_eager still traces forward and backward.
    compiled = torch.compile(fused, fullgraph=True, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    slots, attn, grads = _module_grads(compiled, input, query, 3, upstream)
    fused.zero_grad(set_to_none=True)
    slots_eager, attn_eager, grads_eager = _module_grads(fused, input, query, 3, upstream)
    torch.testing.assert_close(slots, slots_eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, attn_eager, atol=1e-6, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, grads_eager[name], atol=1e-5, rtol=1e-5, msg=lambda message: f"{name}: {message}"
        )


# ------------------------------------------------------------------------------------------ CUDA, paper shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch, slots", [(32, 7), (48, 11), (48, 24)])
@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda)], ids=["cuda"])
def test_step_paper_shapes_cuda(_, batch, slots, dtype):
    """Images (B = 32, S = 7) and video frames (B = 48, S = 11 and 24) at N = 256, D = 256, autotuned."""
    _check_step(batch, slots, 256, 256, dtype)


@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda)], ids=["cuda"])
def test_step_paper_shapes_deterministic_cuda(_):
    inputs = {name: t.requires_grad_() for name, t in _step_inputs(48, 24, 256, 256, torch.float16).items()}
    runs = []
    for _ in range(2):
        slots, attn = fused_slot_attention_step(**inputs, scale=256**-0.5)
        runs.append((slots, attn, *torch.autograd.grad(slots.float().sum(), list(inputs.values()))))
    for first, second in zip(*runs):
        assert torch.equal(first, second)

"""Slot attention throughput: reference eager vs torch.compile(reference) vs fused Triton, whole module.

Times `SlotAttention` (bi-level truncation) forward (under no_grad, as in evaluation) and forward + backward
(as in training) side by side: each benchmark group is one shape × mode × precision, and its rows are the
three paths. `extra_info` records the peak CUDA memory of one call above what was allocated before it
(`torch.cuda.max_memory_allocated`), the shape, the device and the library versions.

    pytest bench/test_bench_slot_attention.py --benchmark-json bench/results/slot_attention-h200.json

Shapes on CUDA are the paper's: images B = 32, S = 7, N = 256, 3 iterations; video frames B = 48 (8 clips ×
6 frames), S = 11 and 24, N = 256, 1 iteration (every frame after the first). Without CUDA it runs tiny shapes
and only reference vs compiled (the fused kernels would run in Triton's interpreter, which times Python), so
the file stays a quick smoke run of the harness.
"""
import contextlib
from dataclasses import dataclass

import pytest
import torch
import triton

from smoothsa.kernels import fused_step_supported
from smoothsa.slot_attention import SlotAttention

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    slots: int
    tokens: int
    num_iter: int


if CUDA:
    SHAPES = [Shape("image", 32, 7, 256, 3), Shape("video-s11", 48, 11, 256, 1), Shape("video-s24", 48, 24, 256, 1)]
    PRECISIONS = ["fp32", "bf16-autocast"]
    ROUNDS = 100
else:
    SHAPES = [Shape("image-tiny", 2, 7, 64, 3), Shape("video-tiny", 2, 11, 64, 1)]
    PRECISIONS = ["fp32"]
    ROUNDS = 5
PATHS = ["reference", "compiled", "fused"]
MODES = ["forward", "forward_backward"]


def _synchronize():
    if CUDA:
        torch.cuda.synchronize()  # time the GPU work, not the launches


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.name)
def test_bench_slot_attention(benchmark, shape, path, mode, precision):
    if path == "fused" and not CUDA:
        pytest.skip("the fused path is timed on CUDA only (the interpreter would time Python)")
    torch.manual_seed(0)
    module = SlotAttention(trunc_bp="bi-level", fused=path == "fused").to(DEVICE)
    input = torch.randn(shape.batch, shape.tokens, module.kv_dim, device=DEVICE)  # (B, N, Dv)
    query = torch.randn(shape.batch, shape.slots, module.embed_dim, device=DEVICE)  # (B, S, D)
    upstream = torch.randn(shape.batch, shape.slots, module.embed_dim, device=DEVICE)  # ∂loss/∂slots
    training = mode == "forward_backward"
    input.requires_grad_(training)
    query.requires_grad_(training)
    autocast = (
        torch.autocast(DEVICE.type, dtype=torch.bfloat16) if precision == "bf16-autocast" else contextlib.nullcontext()
    )
    if path == "fused":
        with autocast:
            reason = fused_step_supported(input, query)
        assert reason is None, f"the fused path would fall back to the reference: {reason}"
    step = module
    if path == "compiled":
        torch._dynamo.reset()  # each benchmark compiles afresh, far from the recompile limit
        step = torch.compile(module, dynamic=False)

    def run():
        with autocast, torch.set_grad_enabled(training):
            slots, _ = step(input, query, num_iter=shape.num_iter)
            if training:
                (slots.float() * upstream).sum().backward()
        if training:
            input.grad = query.grad = None
            module.zero_grad(set_to_none=True)
        _synchronize()

    run()  # compiles (torch.compile) or autotunes (Triton) outside the timed rounds
    peak_bytes = None
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        run()
        peak_bytes = torch.cuda.max_memory_allocated() - baseline

    benchmark.group = f"{shape.name} {mode} {precision}"
    benchmark.extra_info.update(
        {
            "path": path,
            "mode": mode,
            "precision": precision,
            "batch": shape.batch,
            "slots": shape.slots,
            "tokens": shape.tokens,
            "num_iter": shape.num_iter,
            "embed_dim": module.embed_dim,
            "peak_memory_bytes": peak_bytes,
            "peak_memory_mib": None if peak_bytes is None else round(peak_bytes / 2**20, 2),
            "device": torch.cuda.get_device_name(DEVICE) if CUDA else "cpu",
            "torch": torch.__version__,
            "triton": triton.__version__,
        }
    )
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=3, iterations=1)

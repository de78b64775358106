"""The fused kernels build for Hopper without a GPU: every autotune config the pruner keeps at the paper's
shapes, compiled ahead of time for sm_90 (`kernels/aot.py`), spills no registers and fits shared memory.

The compile runs in a subprocess: this test session interprets the kernels (TRITON_INTERPRET=1), the compiler
needs them as kernels. Skipped where Triton lacks its CUDA backend.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from smoothsa.kernels import slot_attention as fused  # noqa: E402


def _has_cuda_backend() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends and Path(triton.knobs.nvidia.ptxas.path).exists()
    except Exception:  # no backend, or no ptxas shipped with it
        return False


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _has_cuda_backend(), reason="Triton has no CUDA backend")]


@pytest.fixture(scope="module")
def hopper_rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    command = [sys.executable, "-m", "smoothsa.kernels.aot", "--dtypes", "fp16", "bf16", "--training",
               "--jobs", str(min(8, os.cpu_count() or 1)), "--json", str(out)]  # fmt: skip
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())["rows"]


def test_every_kept_config_compiles_for_sm90_without_spills(hopper_rows):
    kernels = {(row["kernel"], row["dtype"], row["shape"]) for row in hopper_rows}
    shapes = {"image B=32 S=7", "video B=48 S=24"}  # S = 11 pads to 16 slots as S = 7 does: the same binaries
    assert kernels == {(k, d, s) for k in ("attention fwd", "attention bwd", "gru fwd", "gru bwd")
                       for d in ("fp16", "bf16") for s in shapes}  # fmt: skip
    for row in hopper_rows:
        assert row["spilled_bytes"] == 0, row
        assert 0 < row["registers"] <= 255, row
        assert row["shared_bytes"] <= fused.HOPPER_SHARED, row


def test_shared_memory_bound_holds(hopper_rows):
    """The pruner's shared-memory bound is an upper bound of what the compiler allocates."""
    for row in hopper_rows:
        if row["block_n"] is None:
            continue
        config = triton.Config({"BLOCK_N": row["block_n"]}, num_warps=row["num_warps"], num_stages=row["num_stages"])
        assert row["shared_bytes"] <= fused.shared_bytes_bound(config, row["s_pad"], row["d"], 2), row


def test_kept_configs_follow_the_budgets():
    """At the paper's shapes the pruner keeps several configs per launch, none of them over its tile budget."""
    from smoothsa.kernels.slot_attention import TILE_BUDGET, pruned_configs, tile_elements_per_thread, token_split

    for batch, slots in ((32, 7), (48, 11), (48, 24)):
        _, tokens_per_split = token_split(batch, 256, 132)
        for dtype in (torch.float16, torch.bfloat16):
            arguments = dict(TOKENS_PER_SPLIT=tokens_per_split, S_PAD=max(16, triton.next_power_of_2(slots)), D=256,
                             **fused._dot_args(dtype))  # fmt: skip
            for backward, kernel in ((False, "fwd"), (True, "bwd")):
                kept = pruned_configs(arguments, backward)
                assert len(kept) >= 3, (batch, slots, dtype, kernel)
                for config in kept:
                    assert config.kwargs["BLOCK_N"] <= tokens_per_split
                    assert tile_elements_per_thread(config, arguments["S_PAD"], 256) <= TILE_BUDGET[(kernel, 2)]

"""The fused kernels compiled for Hopper (sm_90) without a GPU: registers, spills and shared memory of every
autotune config the pruner keeps at the paper's shapes, per kernel and dtype, as a Markdown table.

    python bench/aot_table.py                        # fp32, fp16, bf16; every launch (a few minutes)
    python bench/aot_table.py --dtypes fp16 bf16 --training --json /tmp/aot.json

Needs Triton's CUDA backend (its wheel ships ptxas and cuobjdump), no GPU. See `kernels/aot.py`.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # the kernels must be compiled, not interpreted

from smoothsa.kernels.aot import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])

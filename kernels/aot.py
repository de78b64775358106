"""The fused slot-attention kernels compiled ahead of time for a GPU that need not be here.

For each kernel at the paper's shapes, on a given target (Hopper by default: H100 / H200, sm_90, 132 SMs), this
lists the launches the host functions of `slot_attention.py` would make, the autotune configs its pruner keeps
for them, and what each compiled binary needs: registers and local memory (spills) per thread, shared memory per
block. `bench/aot_table.py` prints it as a table; `tests/kernels/test_aot.py` asserts on it.

Needs Triton's CUDA backend (ptxas and cuobjdump ship in its wheel), not a GPU, and the compiled kernels, so
TRITON_INTERPRET must be unset when this module is imported.

Shapes (as in `slot_attention.py`): images B = 32, S = 7; video frames B = 48 (8 clips × 6 frames), S = 11 or 24;
N = 256 tokens; D = 256: the kernels see the projected q, k, v (Ds = 256), never the Dv = 384 features.
"""
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import slot_attention as fused

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SMS = 132  # H100 SXM and H200
HOPPER_SHARED_PER_BLOCK = fused.HOPPER_SHARED
PAPER_SHAPES = (("image", 32, 7), ("video", 48, 11), ("video", 48, 24))  # (what, B, S)
TOKENS = 256
DIM = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KernelResources:
    """What the compiled binary of one kernel and config needs, as ptxas allocated it.

    registers: 32-bit registers per thread. spilled_bytes: local memory per thread, stack frame included
    (register spills: these kernels keep no arrays there). shared_bytes: shared memory per block (Triton's pipeline buffers
    and layout conversions). registers and spilled_bytes are None when the block's shared memory is over the
    limit: such a config is dropped before ptxas runs.
    """

    registers: int | None
    spilled_bytes: int | None
    shared_bytes: int


# Scalar and pointer types of kernel arguments, as Triton's signatures spell them.
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _ast_source(kernel, arguments: dict, config: triton.Config):
    """The kernel specialised as Triton's launcher would specialise it for these arguments and this config.

    `arguments` maps every parameter that is not in `config` to its launch value; a pointer may be given as a
    tensor or, ahead of time, as its torch dtype (taken as 16-byte aligned, as PyTorch allocates).
    """
    values = {**arguments, **config.kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = values[param.name]
        aligned = False
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, (torch.Tensor, torch.dtype)):
            signature[param.name] = POINTER_TYPES[value.dtype if isinstance(value, torch.Tensor) else value]
            aligned = not isinstance(value, torch.Tensor) or value.data_ptr() % 16 == 0
        elif isinstance(value, int):
            signature[param.name] = "i32"
            aligned = value % 16 == 0
        else:
            signature[param.name] = "fp32"
        if aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(kernel, signature, constexprs, attrs)


def _binary_resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack frame + local bytes) per thread of a one-kernel cubin, from `cuobjdump --dump-resource-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", report)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for the kernel:\n{report}")
    registers, stack, local = map(int, match.groups())
    return registers, stack + local


def kernel_resources(kernel, arguments: dict, config: triton.Config, target, shared_limit: int) -> KernelResources:
    """Compiles `kernel` with `config` for `target` (a `triton.backends.compiler.GPUTarget`, e.g.
    `GPUTarget("cuda", 90, 32)` for Hopper; no GPU needed) and reads what the binary needs.

    The proof that a config builds for a GPU without one (`kernels/aot.py`); Triton's cache keeps the result.
    """
    compiled = triton.compile(
        _ast_source(kernel, arguments, config), target=target,
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )  # fmt: skip
    shared = compiled.metadata.shared
    if shared > shared_limit:
        return KernelResources(None, None, shared)
    return KernelResources(*_binary_resources(compiled.asm["cubin"]), shared)


@dataclass(frozen=True)
class Launch:
    """One kernel launch at one shape: its arguments as the host function passes them (pointers as dtypes) and
    the configs the pruner keeps for them."""

    kernel: str
    shape: str
    dtype: torch.dtype
    arguments: dict
    configs: tuple


def _attention_launches(shape: str, batch: int, slots: int, dtype: torch.dtype, sms: int) -> list[Launch]:
    _, tokens_per_split = fused.token_split(batch, TOKENS, sms)
    common = dict(
        S=slots, N=TOKENS, TOKENS_PER_SPLIT=tokens_per_split, scale=DIM**-0.5, D=DIM,
        S_PAD=max(16, triton.next_power_of_2(slots)), **fused._dot_args(dtype),
    )  # fmt: skip
    forward = dict(Q_ptr=dtype, K_ptr=dtype, V_ptr=dtype, ATTN_ptr=dtype, MASS_ptr=torch.float32,
                   ACC_ptr=torch.float32, **common)  # fmt: skip
    launches = [Launch("attention fwd", shape, dtype, forward, tuple(fused.pruned_configs(forward)))]
    for has_dattn in (False, True):
        backward = dict(
            Q_ptr=dtype, K_ptr=dtype, V_ptr=dtype, ATTN_ptr=dtype, DATTN_ptr=dtype, U_ptr=torch.float32,
            MASS_ptr=torch.float32, DU_ptr=dtype, DQ_ptr=torch.float32, DK_ptr=dtype, DV_ptr=dtype, eps=1e-5,
            HAS_DATTN=has_dattn, **common,
        )  # fmt: skip
        name = "attention bwd" + (" + dattn" if has_dattn else "")
        launches.append(Launch(name, shape, dtype, backward, tuple(fused.pruned_configs(backward, backward=True))))
    return launches


def _gru_launches(shape: str, batch: int, slots: int, dtype: torch.dtype) -> list[Launch]:
    """The elementwise GRU kernels: gates in the compute dtype; the hidden state and slots float32 as under
    autocast (`dtype` float32: everything float32)."""
    numel = batch * slots * DIM
    config = (triton.Config({}, num_warps=fused.GRU_WARPS, num_stages=fused.GRU_STAGES),)
    sizes = dict(numel=numel, D=DIM, BLOCK=fused.GRU_BLOCK)
    forward = dict(GI_ptr=dtype, GH_ptr=dtype, X_ptr=torch.float32, Y_ptr=torch.float32, **sizes)
    backward = dict(DY_ptr=torch.float32, GI_ptr=dtype, GH_ptr=dtype, X_ptr=torch.float32, DGI_ptr=dtype,
                    DGH_ptr=dtype, DX_ptr=torch.float32, **sizes)  # fmt: skip
    return [Launch("gru fwd", shape, dtype, forward, config), Launch("gru bwd", shape, dtype, backward, config)]


KERNELS = {
    "attention fwd": "_slot_attention_fwd_kernel",
    "attention bwd": "_slot_attention_bwd_kernel",
    "attention bwd + dattn": "_slot_attention_bwd_kernel",
    "gru fwd": "_gru_fwd_kernel",
    "gru bwd": "_gru_bwd_kernel",
}


def paper_launches(dtypes=DTYPES, sms: int = HOPPER_SMS) -> list[Launch]:
    """Every kernel launch of a training step (forward and backward) at the paper's shapes, per dtype."""
    launches = []
    for dtype in dtypes:
        for shape, batch, slots in PAPER_SHAPES:
            label = f"{shape} B={batch} S={slots}"
            launches += _attention_launches(label, batch, slots, dtype, sms)
            launches += _gru_launches(label, batch, slots, dtype)
    return launches


@dataclass(frozen=True)
class Row:
    """One compiled config of one launch."""

    launch: Launch
    config: triton.Config
    resources: KernelResources

    def describe_config(self) -> str:
        block = self.config.kwargs.get("BLOCK_N", fused.GRU_BLOCK if "gru" in self.launch.kernel else None)
        name = "BLOCK_N" if "attention" in self.launch.kernel else "BLOCK"
        return f"{name}={block} warps={self.config.num_warps} stages={self.config.num_stages}"


def compile_launches(launches: list[Launch], target: GPUTarget = HOPPER,
                     shared_limit: int = HOPPER_SHARED_PER_BLOCK) -> list[Row]:  # fmt: skip
    """Compiles every kept config of every launch for `target`; one `Row` each."""
    if fused.INTERPRET:
        raise RuntimeError("kernels.aot compiles the kernels: import it with TRITON_INTERPRET unset")
    rows = []
    for launch in launches:
        kernel = getattr(fused, KERNELS[launch.kernel])
        for config in launch.configs:
            resources = kernel_resources(kernel, launch.arguments, config, target, shared_limit)
            rows.append(Row(launch, config, resources))
    return rows


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def markdown_table(rows: list[Row], target: GPUTarget = HOPPER) -> str:
    """One line per (kernel, shape, dtype, config); launches whose compile key is the same (S = 7 and S = 11
    both pad to 16 slots) share one line."""
    lines = [
        f"Compiled for {target.backend} sm_{target.arch} with Triton {triton.__version__}; limits: 255 registers "
        f"per thread, {HOPPER_SHARED_PER_BLOCK // 1024} KiB shared memory per block.",
        "",
        "| kernel | shapes | dtype | config | registers | spilled bytes | shared memory |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    merged: dict[tuple, list[str]] = {}
    facts = {}
    for row in rows:
        key = (row.launch.kernel, row.launch.dtype, row.launch.arguments.get("S_PAD"), row.describe_config())
        merged.setdefault(key, []).append(row.launch.shape)
        facts[key] = row.resources
    for key, shapes in merged.items():
        kernel, dtype, _, config = key
        res = facts[key]
        registers = "–" if res.registers is None else str(res.registers)
        spilled = "–" if res.spilled_bytes is None else str(res.spilled_bytes)
        lines.append(f"| {kernel} | {'; '.join(shapes)} | {DTYPE_NAMES[dtype]} | {config} | {registers} | {spilled} "
                     f"| {res.shared_bytes / 1024:.1f} KiB |")  # fmt: skip
    return "\n".join(lines) + "\n"


def compile_rows(launches: list[Launch], jobs: int = 1, target: GPUTarget = HOPPER,
                 shared_limit: int = HOPPER_SHARED_PER_BLOCK) -> list[Row]:  # fmt: skip
    """`compile_launches` on `jobs` threads (ptxas runs as a process, Triton's passes release the GIL)."""
    if jobs <= 1:
        return compile_launches(launches, target, shared_limit)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs) as pool:
        parts = pool.map(lambda launch: compile_launches([launch], target, shared_limit), launches)
        return [row for part in parts for row in part]


def training_launches(dtypes=DTYPES, sms: int = HOPPER_SMS) -> list[Launch]:
    """The launches of a training step, one per compile key: no attention-map gradient (the models never
    back-propagate through the returned attention), and S = 11 left out (it pads to 16 slots, as S = 7 does)."""
    return [l for l in paper_launches(dtypes, sms) if "dattn" not in l.kernel and "S=11" not in l.shape]


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [
        dict(kernel=r.launch.kernel, shape=r.launch.shape, dtype=DTYPE_NAMES[r.launch.dtype],
             s_pad=r.launch.arguments.get("S_PAD"), d=DIM, config=r.describe_config(),
             block_n=r.config.kwargs.get("BLOCK_N"), num_warps=r.config.num_warps, num_stages=r.config.num_stages,
             registers=r.resources.registers, spilled_bytes=r.resources.spilled_bytes,
             shared_bytes=r.resources.shared_bytes)
        for r in rows
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    import os

    parser = argparse.ArgumentParser(description="Compile the fused kernels for Hopper (sm_90) without a GPU.")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPE_NAMES.values()), choices=list(DTYPE_NAMES.values()))
    parser.add_argument("--training", action="store_true", help="only the launches of a training step, one per compile key")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    dtypes = [dtype for dtype, name in DTYPE_NAMES.items() if name in args.dtypes]
    launches = (training_launches if args.training else paper_launches)(dtypes)
    rows = compile_rows(launches, args.jobs)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"triton": triton.__version__, "target": f"sm_{HOPPER.arch}", "rows": rows_as_dicts(rows)}, file)
    print(markdown_table(rows), end="")


if __name__ == "__main__":
    main()

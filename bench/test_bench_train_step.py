"""Full training step throughput (forward, losses, scaled backward, clipping, Adam), backbone included.

Each group is one preset (`smoothsa_r-coco`: images; `smoothsav_c-movi_c`: 6-frame clips, S = 11 boxes) and its
rows are five ways to run the same step, `smoothsa.trainer.Trainer.step` (see `TrainingStep` in conftest):

    (a) eager-fp32             reference PyTorch slot attention (fused=False), float32
    (b) eager-fp16             (a) under fp16 autocast with a GradScaler (the official setting)
    (c) fused-fp16             fused Triton slot-attention kernels + fp16 autocast
    (d) fused-fp16-compile     (c) with torch.compile(model)
    (e) fused-fp16-cudagraphs  (d) with mode="reduce-overhead" (CUDA graphs where inductor can use them)
    (f) fused-bf16-compile     (d) under bf16 autocast (no loss scaling)
    (g) fused-bf16-cudagraphs  (f) with mode="reduce-overhead"

(c)-(g) run on CUDA only: on the CPU Triton runs its interpreter, which would time Python. Compiling and CUDA-graph
recording happen in the warm-up rounds. `extra_info` records images/s (frames/s for video), the peak CUDA memory of
the timed rounds, the model FLOPs of a step (`train_flops_per_image`, formula below), the achieved FLOP/s and, on
known GPUs, its fraction of the dense fp16/bf16 tensor-core peak; the JSON hook in conftest adds each row's speedup
over (a) and (b).

    pytest bench/test_bench_train_step.py --benchmark-json bench/results/<device>-<date>.json
    python bench/plot.py bench/results/<device>-<date>.json --out bench/results/summary

Peak assumption: H100 SXM and H200 ≈ 989 TFLOP/s dense fp16/bf16 (no sparsity), H100 PCIe ≈ 756, A100 ≈ 312
(NVIDIA data sheets); the device name decides, other GPUs record no fraction. Every variant's fraction is taken
against that half-precision peak, so the fp32 row reads as how far it is from the half-precision roof.
"""
import dataclasses
from dataclasses import dataclass

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from smoothsa import build_model
from smoothsa.presets import ModelConfig, get_preset
from smoothsa.tasks import task_for
from smoothsa.trainer import set_detach_flag

# ---------------------------------------------------------------------------------------------------------------
# Model FLOPs, from the shapes. A matmul (M×K)·(K×N) costs 2·M·K·N; norms, softmax, GELU, GRU gates and the losses
# are left out (they are memory-bound and small). Checked against torch's FlopCounterMode below.

# DINOv2 ViT-S/14 reg4 at 224×224: 16·16 patches + [cls] + 4 registers, 12 blocks, width 384, MLP 1536.
VIT_PATCH, VIT_GRID, VIT_PREFIX, VIT_DEPTH, VIT_DIM = 14, 16, 5, 12, 384


def attention_flops(queries: int, keys: int, dim: int) -> float:
    """Multi-head attention of `queries` tokens on `keys` tokens, width `dim` (heads split `dim`): the q and out
    projections on the queries, k and v on the keys, then q·kᵀ and attn·v."""
    return 4 * queries * dim * dim + 4 * keys * dim * dim + 4 * queries * keys * dim


def ffn_flops(tokens: int, dim: int, hidden: int) -> float:
    return 4 * tokens * dim * hidden


def backbone_flops(config: ModelConfig) -> float:
    """Frozen backbone on one image: DINOv2 (patch embedding + 12 blocks on 261 tokens) or the patch projection."""
    if config.backbone == "patch":
        patch = config.image_size // config.grid
        return 2 * config.grid**2 * (3 * patch * patch) * config.feature_dim
    tokens, dim = VIT_GRID**2 + VIT_PREFIX, VIT_DIM
    patch_embed = 2 * VIT_GRID**2 * (3 * VIT_PATCH * VIT_PATCH) * dim
    block = attention_flops(tokens, tokens, dim) + ffn_flops(tokens, dim, 4 * dim)  # 24·L·D² + 4·L²·D
    return patch_embed + VIT_DEPTH * block


def flops_per_sample(config: ModelConfig, slots: int, frames: int | None = None) -> dict[str, tuple[float, int]]:
    """Forward FLOPs of one image (or one clip of `frames` frames) by component, each with its training multiplier.

    Multipliers: 3 for a trained component (forward + backward, whose input and weight gradients cost 2× the
    forward); 1 for the frozen backbone (forward only: its output is detached, no weight gradients) and for the
    slot-attention iterations that bi-level truncation runs without a graph (all but the last).

    Components (N = grid² tokens, Dv feature width, Ds slot width, S slots):
        encode_project  MLP Dv→Dv→Dv on N tokens                                   4·N·Dv²
        initializer     Linear Dv→Ds on N (+ box MLP 4→Ds→Ds for MOVi), then the swapped layer: cross-attention
                        (S queries on N keys), self-attention (S), FFN Ds→4Ds→Ds
        slot_attention  k, v projections (4·N·Dv·Ds), then per iteration: q projection, logits and
                        attn·v (4·S·N·Ds), GRU (12·S·Ds²), FFN (16·S·Ds²) = 30·S·Ds² + 4·S·N·Ds
        transit         video frames 1..T−1: Linear Dv→Ds on N, post-norm decoder layer (S on N), one SA iteration
        decoder         Linear Dv→Dv on N, Linear Ds→Dv on S, then per layer self-attention (N), cross-attention
                        (N on S), FFN Dv→4Dv→Dv = 28·N·Dv² + 4·N²·Dv + 4·S·Dv² + 4·N·S·Dv
    """
    t = frames or 1
    n, dv, ds, s = config.grid**2, config.feature_dim, config.slot_dim, slots
    initializer = 2 * n * dv * ds + attention_flops(s, n, ds) + attention_flops(s, s, ds) + ffn_flops(s, ds, 4 * ds)
    if config.initializer == "mlp_preheated":
        initializer += 2 * s * (4 * ds + ds * ds)
    kv = 4 * n * dv * ds
    iteration = 2 * s * ds * ds + 4 * s * n * ds + 12 * s * ds * ds + ffn_flops(s, ds, 4 * ds)
    truncated = config.num_iter - 1 if config.trunc_bp == "bi-level" else 0
    layer = attention_flops(n, n, dv) + attention_flops(n, s, dv) + ffn_flops(n, dv, 4 * dv)
    decoder = 2 * n * dv * dv + 2 * s * ds * dv + config.decoder_layers * layer
    components = {
        "backbone": (t * backbone_flops(config), 1),
        "encode_project": (t * 4 * n * dv * dv, 3),
        "initializer": (initializer, 3),
        "slot_attention_truncated": (truncated * iteration, 1),
        "slot_attention": (kv + (config.num_iter - truncated) * iteration, 3),
        "decoder": (t * decoder, 3),
    }
    if t > 1:  # later frames: the transit predicts the query, then one (untruncated) SA iteration
        transit = 2 * n * dv * ds + attention_flops(s, s, ds) + attention_flops(s, n, ds) + ffn_flops(s, ds, 4 * ds)
        components["transit"] = ((t - 1) * (transit + kv + iteration), 3)
    return components


def train_flops_per_image(config: ModelConfig, slots: int, frames: int | None = None) -> float:
    """Model FLOPs of one training step per image (per frame for video)."""
    return sum(f * m for f, m in flops_per_sample(config, slots, frames).values()) / (frames or 1)


def forward_flops_per_image(config: ModelConfig, slots: int, frames: int | None = None) -> float:
    return sum(f for f, _ in flops_per_sample(config, slots, frames).values()) / (frames or 1)


PEAK_FP16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))


def gpu_peak_flops(name: str) -> float | None:
    """Dense fp16/bf16 tensor-core peak of a GPU from its name (see the module docstring), None if unknown."""
    for key, peak in PEAK_FP16_FLOPS:
        if key in name:
            return peak
    return None


@pytest.mark.parametrize(
    "preset, frames, slots, backbone",
    [("smoothsa_r-coco", None, 7, "dinov2"), ("smoothsav_c-movi_c", 3, 5, "patch")],
    ids=["image-dinov2", "video-patch"],
)
def test_flop_formula_matches_flop_counter(preset, frames, slots, backbone):
    """The formula at the paper's dimensions (N = 256, Dv = 384, Ds = 256, 4 decoder layers) agrees with
    FlopCounterMode's count of one training step (attention through the math SDPA backend, so its matmuls are
    counted), to 1 %. The video case uses the cheap patch backbone: DINOv2 is checked by the image case."""
    config = get_preset(preset)
    config.model = dataclasses.replace(config.model, fused=False, backbone=backbone)
    torch.manual_seed(0)
    model = build_model(config.model)
    set_detach_flag(model, False)
    if frames is None:
        batch = {"image": torch.randn(1, 3, 256, 256)}
    else:
        batch = {"video": torch.randn(1, frames, 3, 256, 256), "bbox": torch.rand(1, frames, slots, 4)}
    task = task_for(config)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
        terms = task.losses(task.forward(model, batch), batch)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as backward:
        sum(terms.values()).backward()
    counted_forward = forward.get_total_flops() / (frames or 1)
    counted_train = counted_forward + backward.get_total_flops() / (frames or 1)
    assert forward_flops_per_image(config.model, slots, frames) == pytest.approx(counted_forward, rel=0.01)
    assert train_flops_per_image(config.model, slots, frames) == pytest.approx(counted_train, rel=0.01)


# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    fused: bool
    amp: str  # "none" | "fp16" | "bf16", as smoothsa.train.RunOptions.amp
    compile: str | None = None  # torch.compile mode; None: eager
    cuda_only: bool = False


VARIANTS = [
    Variant("eager-fp32", fused=False, amp="none"),
    Variant("eager-fp16", fused=False, amp="fp16"),
    Variant("fused-fp16", fused=True, amp="fp16", cuda_only=True),
    Variant("fused-fp16-compile", fused=True, amp="fp16", compile="default", cuda_only=True),
    Variant("fused-fp16-cudagraphs", fused=True, amp="fp16", compile="reduce-overhead", cuda_only=True),
    Variant("fused-bf16-compile", fused=True, amp="bf16", compile="default", cuda_only=True),
    Variant("fused-bf16-cudagraphs", fused=True, amp="bf16", compile="reduce-overhead", cuda_only=True),
]
PRESETS = ["smoothsa_r-coco", "smoothsav_c-movi_c"]


def graph_break_reasons(graph_breaks: dict) -> list[str]:
    """One line per distinct graph break: its title and the source line dynamo stopped at."""
    reasons = set()
    for message in graph_breaks:
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        where = next((line.lstrip("# ") for line in lines if line.startswith("# File")), "")
        reasons.add(f"{lines[0]} at {where}" if where else lines[0])
    return sorted(reasons)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda variant: variant.name)
@pytest.mark.parametrize("preset_name", PRESETS)
def test_bench_train_step(benchmark, record, sizes, device, sync, training_step, check_fused, preset_name, variant):
    if variant.cuda_only and device.type != "cuda":
        pytest.skip(f"{variant.name}: fused kernels are timed on CUDA only (on CPU Triton's interpreter times Python)")
    workload = sizes.train[preset_name]
    preset = workload.config(fused=variant.fused)
    if variant.compile is not None:
        torch._dynamo.reset()  # each row compiles afresh, far from the recompile limit
        torch._dynamo.utils.counters.clear()
    step = training_step(preset, variant.amp, variant.compile)
    if variant.fused:
        check_fused(step.model, workload, preset)
    batch = workload.make_batch(device)

    def run():
        step(batch)
        sync()

    benchmark.group = f"train_step {preset_name}"
    benchmark.pedantic(
        run, setup=record.peak_memory_setup(sizes.warmup_rounds), rounds=sizes.rounds, warmup_rounds=sizes.warmup_rounds
    )
    step.check()

    flops_per_image = train_flops_per_image(preset.model, workload.slots, workload.frames)
    counters = torch._dynamo.utils.counters
    rate = record.finish(
        workload.images_per_batch,
        workload.unit,
        variant=variant.name,
        preset=preset_name,
        batch=workload.batch,
        frames=workload.frames,
        slots=workload.slots,
        amp=variant.amp,
        fused=variant.fused,
        compile=variant.compile,
        model_overrides=workload.overrides,
        train_flops_per_image=flops_per_image,
        graph_breaks=sum(counters["graph_break"].values()) if variant.compile else None,
        graph_break_reasons=graph_break_reasons(counters["graph_break"]) if variant.compile else None,
        cudagraph_skips=counters["inductor"].get("cudagraph_skips", 0) if variant.compile else None,
    )
    if rate is not None:
        achieved = flops_per_image * rate
        peak = gpu_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        benchmark.extra_info["achieved_tflops"] = achieved / 1e12
        benchmark.extra_info["peak_flops_assumed"] = peak
        benchmark.extra_info["peak_fraction"] = achieved / peak if peak else None

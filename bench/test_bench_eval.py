"""Evaluation throughput: the model in eval mode under `inference_mode` plus the discovery metrics (ARI, ARI-fg,
mBO, mIoU from the decoder attention, `smoothsa.tasks` `metrics`), per validation batch, as
`smoothsa.evaluation.evaluate` runs it without the data loader.

Groups: smoothsa_r-coco (B = 32 images on CUDA) and smoothsav_c-movi_c (B = 8 whole 24-frame videos, S = 11, as
MOVi validation runs them). Rows: eager reference in fp32 and under fp16 autocast, then (CUDA only) the fused
slot-attention kernels under fp16 and the same with torch.compile(model). `extra_info` records images/s (frames/s
for video), the peak CUDA memory of the timed rounds and, in the JSON, the speedups over the eager rows.

    pytest bench/test_bench_eval.py --benchmark-json bench/results/eval-<device>-<date>.json
"""
from dataclasses import dataclass

import pytest
import torch

from smoothsa import build_model
from smoothsa.evaluation import autocast
from smoothsa.tasks import task_for

SEGMENT_CHANNELS = 8  # ground-truth masks per image: a typical COCO count after the crop


@dataclass(frozen=True)
class Variant:
    name: str
    fused: bool
    amp: str  # "none" | "fp16"
    compile: bool = False
    cuda_only: bool = False


VARIANTS = [
    Variant("eager-fp32", fused=False, amp="none"),
    Variant("eager-fp16", fused=False, amp="fp16"),
    Variant("fused-fp16", fused=True, amp="fp16", cuda_only=True),
    Variant("fused-fp16-compile", fused=True, amp="fp16", compile=True, cuda_only=True),
]
PRESETS = ["smoothsa_r-coco", "smoothsav_c-movi_c"]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda variant: variant.name)
@pytest.mark.parametrize("preset_name", PRESETS)
def test_bench_eval(benchmark, record, sizes, device, sync, check_fused, preset_name, variant):
    if variant.cuda_only and device.type != "cuda":
        pytest.skip(f"{variant.name}: fused kernels are timed on CUDA only (on CPU Triton's interpreter times Python)")
    workload = sizes.eval[preset_name]
    preset = workload.config(fused=variant.fused)
    torch.manual_seed(0)
    model = build_model(preset.model).to(device).eval()
    if variant.fused:
        check_fused(model, workload, preset)
    net = torch.compile(model) if variant.compile else model
    batch = workload.make_batch(device, segment_channels=SEGMENT_CHANNELS)
    task = task_for(preset)

    def run():
        with torch.inference_mode():
            with autocast(device, variant.amp):
                out = task.forward(net, batch)
            scores = task.metrics(out, batch, official_compat=False)  # outside autocast, as in evaluate()
        sync()
        return scores

    benchmark.group = f"eval {preset_name}"
    scores = benchmark.pedantic(
        run, setup=record.peak_memory_setup(sizes.warmup_rounds), rounds=sizes.rounds, warmup_rounds=sizes.warmup_rounds
    )
    assert all(torch.isfinite(value).all() for value in scores.values()), f"non-finite metrics: {scores}"
    record.finish(
        workload.images_per_batch,
        workload.unit,
        variant=variant.name,
        preset=preset_name,
        batch=workload.batch,
        frames=workload.frames,
        slots=workload.slots,
        amp=variant.amp,
        fused=variant.fused,
        compile="default" if variant.compile else None,
        model_overrides=workload.overrides,
    )

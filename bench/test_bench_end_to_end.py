"""End-to-end training throughput with the real data path: LMDB → decode → augment → collate → host-to-device
→ training step, torch DataLoader vs torch-gpu (workers only decode; the device crops, resizes, flips and
normalises) vs DALI, on a synthetic COCO-like LMDB (480×640 JPEGs, written once per session).

A timed round is one epoch of `smoothsa_r-coco` training steps (`TrainingStep` in conftest: `Trainer.step`, which
reads nothing on the host). On CUDA the model runs as `smoothsa.train` runs it by default (fused kernels, fp16
autocast, torch.compile; compiled in the warm-up epoch) at B = 32; on the CPU it is the small eager fp32 model of
the smoke sizes. `extra_info` records images/s and how long the loop was blocked in
`next(loader)`:

    loader_wait_fraction         time blocked in next() / epoch time (a stall shows here)
    first_batch_wait_s           the wait for the epoch's first batch (worker start-up; DataLoader workers are
                                 re-created each epoch because they carry its seeds)
    steady_loader_wait_fraction  the same fraction without the first batch

    pytest bench/test_bench_end_to_end.py --benchmark-json bench/results/e2e-<device>-<date>.json

DALI rows are skipped unless `nvidia.dali` is importable. The loader-only benchmark is bench/test_bench_loader.py.
"""
import importlib.util
import os
import time

import pytest
import torch

from smoothsa.dataio import write_synthetic
from smoothsa.evaluation import loader_for

DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="session")
def coco_like(tmp_path_factory, sizes):
    """A data folder with train.lmdb: `sizes.end_to_end.images` synthetic JPEG scenes in the COCO layout."""
    folder = tmp_path_factory.mktemp("coco_like")
    e2e = sizes.end_to_end
    write_synthetic(folder, "train", num=e2e.images, height=e2e.height, width=e2e.width, image_format="jpeg")
    return folder


@pytest.mark.parametrize(
    "backend",
    ["torch", "torch-gpu",
     pytest.param("dali", marks=pytest.mark.skipif(not DALI, reason="nvidia.dali is not installed"))],
)
def test_bench_end_to_end(benchmark, record, sizes, device, sync, training_step, coco_like, backend):
    e2e = sizes.end_to_end
    workload = e2e.workload
    preset = workload.config(fused=CUDA)
    amp = os.environ.get("SMOOTHSA_BENCH_AMP", "fp16") if CUDA else "none"
    step = training_step(preset, amp, "default" if CUDA else None)
    loader = loader_for(preset, coco_like, "train", workload.batch, True, e2e.workers, backend, seed=0,
                        device=device if backend != "torch" else None)
    epochs = []  # (blocked in next(), of which the first batch, epoch time, steps), one per round

    def epoch():
        blocked = first = 0.0
        steps = 0
        start = time.perf_counter()
        batches = iter(loader)
        while True:
            before = time.perf_counter()
            batch = next(batches, None)
            waited = time.perf_counter() - before
            if batch is None:
                break
            blocked += waited
            first = first or waited
            step(batch)  # the step moves the batch to the device
            steps += 1
        sync()
        epochs.append((blocked, first, time.perf_counter() - start, steps))

    benchmark.group = f"end_to_end {workload.preset}"
    benchmark.pedantic(
        epoch, setup=record.peak_memory_setup(e2e.warmup_rounds), rounds=e2e.rounds, warmup_rounds=e2e.warmup_rounds
    )
    step.check()
    timed = epochs[-e2e.rounds :]
    steps = timed[-1][3]
    assert steps == e2e.images // workload.batch, f"an epoch ran {steps} steps, expected {e2e.images // workload.batch}"
    blocked, first, total = (sum(epoch[i] for epoch in timed) for i in range(3))
    record.finish(
        steps * workload.images_per_batch,
        workload.unit,
        variant=f"{backend}-loader",
        preset=workload.preset,
        backend=backend,
        workers=e2e.workers,
        batch=workload.batch,
        steps_per_epoch=steps,
        dataset_images=e2e.images,
        image_size=(e2e.height, e2e.width),
        model_variant=f"fused-{amp}-compile" if CUDA else "eager-fp32",
        model_overrides=workload.overrides,
        loader_wait_fraction=blocked / total,
        first_batch_wait_s=first / len(timed),
        steady_loader_wait_fraction=(blocked - first) / (total - first),
    )

"""Worker CPU per training sample: the `torch` loader vs `torch-gpu` (workers only decode), side by side.

What feeds a GPU is CPU time in the workers, so a round is one training epoch (COCO instance mode, batch 16)
over a synthetic LMDB of COCO-sized 480x640 JPEGs with one worker process, and the figure is the CPU time
(user + system) the worker used, from `getrusage(RUSAGE_CHILDREN)` once it has been joined at the end of the
epoch, per sample. Two sets of keys: `image`, what training a discovery model loads, and `all` (image,
segment, bbox, clazz), what validation loads. The `torch` worker decodes, crops, resizes, flips, normalises
and makes the masks; the `torch-gpu` worker decodes and cuts out the windows: its epoch is read through
`raw_batches()`, so the device part, which here would run on this CPU in the main process, neither counts
nor competes with the worker. The rounds of the two loaders alternate, so a busy machine slows both alike;
the `torch-gpu` rows record `cpu_ratio_vs_torch` (ratio of the medians; the goal is >= 2.5) and, for
information, the main process's CPU per sample of the device part when it runs on the CPU.

    pytest bench/test_bench_loader_cpu.py -q -s
"""

import resource
import statistics
import time

import pytest
import torch

from smoothsa.dataio import COCO, LoaderOptions, make_loader, write_synthetic

NUM_IMAGES = 256  # a worker costs ~20 ms to start and stop: ~0.1 ms per sample here, in both rows
BATCH_SIZE = 16
ROUNDS = 3
BACKENDS = ("torch", "torch-gpu")
KEYS = ("image", "all")


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    return write_synthetic(folder, "train", num=NUM_IMAGES, height=480, width=640, image_format="jpeg")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def loader_of(path, backend: str, keys: str):
    everything = keys == "all"
    dataset = COCO(path, is_training=True, mode="instance", with_segment=everything, with_bbox=everything,
                   with_clazz=everything)
    return make_loader(dataset, LoaderOptions(batch_size=BATCH_SIZE, workers=1, seed=0, backend=backend))


def worker_epoch(loader, backend: str) -> tuple[int, float]:
    """Samples of one epoch and the worker CPU seconds it took (the worker is joined when the epoch ends)."""
    before = children_cpu_s()
    batches = loader.raw_batches() if backend == "torch-gpu" else iter(loader)
    count = sum(len(batch.encoded) if backend == "torch-gpu" else batch["image"].shape[0] for batch in batches)
    return count, children_cpu_s() - before


@pytest.fixture(scope="module", params=KEYS)
def measured(request, coco_like) -> tuple[str, dict[str, list[float]]]:
    """The keys, and the worker CPU ms per sample of every round, per backend, the rounds of the two backends
    interleaved."""
    keys = request.param
    loaders = {backend: loader_of(coco_like, backend, keys) for backend in BACKENDS}
    for backend in BACKENDS:  # warm-up: page cache, first imports
        worker_epoch(loaders[backend], backend)
    per_sample = {backend: [] for backend in BACKENDS}
    for _ in range(ROUNDS):
        for backend in BACKENDS:
            count, seconds = worker_epoch(loaders[backend], backend)
            assert count == NUM_IMAGES
            per_sample[backend].append(seconds / count * 1e3)
    return keys, per_sample


@pytest.mark.parametrize("backend", BACKENDS)
def test_worker_cpu_ms_per_sample(benchmark, record, coco_like, measured, backend):
    keys, measured = measured
    median = statistics.median(measured[backend])
    fields = {"variant": f"{backend}, {keys} keys", "worker_cpu_ms_per_sample": median,
              "worker_cpu_ms_rounds": measured[backend]}
    loader = loader_of(coco_like, backend, keys)
    start = time.process_time()
    count = benchmark.pedantic(lambda: sum(batch["image"].shape[0] for batch in loader), rounds=1, iterations=1)
    if count is not None:  # None under --benchmark-disable
        fields["main_cpu_ms_per_sample"] = (time.process_time() - start) / count * 1e3
    if backend == "torch-gpu":
        fields["cpu_ratio_vs_torch"] = statistics.median(measured["torch"]) / median
    record.finish(NUM_IMAGES, **fields)
    print(f"\n{backend}, {keys} keys: worker CPU {median:.2f} ms/sample" + (
        f", {fields['cpu_ratio_vs_torch']:.2f}x less than torch" if backend == "torch-gpu" else ""))
    assert torch.tensor(measured[backend]).gt(0).all()

"""Loader throughput (images/s): torch DataLoader with 0 and 2 workers, torch-gpu, DALI (CPU mode here).

One training epoch (random crop, resize to 256, flip, normalise, masks) over a synthetic LMDB of
COCO-sized JPEGs (480x640), batch 16. The torch-gpu row runs its device part on cuda:0 where there is one
(else on the CPU, in the main process). On a GPU machine, add `device_id=0` to the DALI case to time the
"mixed" decoder.

    pytest bench/test_bench_loader.py --benchmark-columns=mean,rounds
    pytest bench/test_bench_loader.py --benchmark-json bench/results/loader-cpu.json
"""

import os

import pytest
import torch

from smoothsa.dataio.datasets import COCO
from smoothsa.dataio.loader import LoaderOptions, make_loader
from smoothsa.dataio.synthetic import write_synthetic

NUM_IMAGES = 64
BATCH_SIZE = 16


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    return write_synthetic(folder, "train", num=NUM_IMAGES, height=480, width=640, image_format="jpeg")


def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


CASES = [
    pytest.param("torch", 0, id="torch-0-workers"),
    pytest.param("torch", 2, id="torch-2-workers"),
    pytest.param("torch-gpu", 2, id="torch-gpu-2-workers"),
    pytest.param(
        "dali", 2, id="dali-cpu-2-threads", marks=pytest.mark.skipif(not _dali_available(), reason="DALI not installed")
    ),
]


@pytest.mark.parametrize("backend, workers", CASES)
def test_loader_images_per_second(benchmark, coco_like, backend, workers):
    dataset = COCO(coco_like, is_training=True, mode="instance", with_bbox=True, with_clazz=True)
    device_id = 0 if torch.cuda.is_available() and backend == "torch-gpu" else None
    options = LoaderOptions(batch_size=BATCH_SIZE, workers=workers, seed=0, backend=backend, device_id=device_id)
    loader = make_loader(dataset, options)

    def epoch() -> int:
        return sum(batch["image"].shape[0] for batch in loader)

    count = benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=1)
    assert count == NUM_IMAGES
    benchmark.extra_info["images_per_s"] = NUM_IMAGES / benchmark.stats.stats.mean
    benchmark.extra_info["cpu_count"] = os.cpu_count()

"""Shared fixtures of the throughput benchmarks: the device, the workload sizes, and what every result records.

The device is chosen once: CUDA when `torch.cuda.is_available()`, else the CPU. On CUDA the sizes are the
paper's (smoothsa_r-coco: B = 32 images; smoothsav_c-movi_c: B = 8 clips × 6 frames, S = 11 boxes); on the CPU
they are a smoke run of the harness (B = 2, the download-free `patch` backbone at 64×64 pixels, an 8×8 grid and
a 1-layer decoder) so the whole suite takes minutes. CPU numbers say nothing about GPU speed.

`pytest_benchmark_update_json` adds, to every result of a group that has them, the speedup over the group's
"eager-fp32" and "eager-fp16" rows (ratio of medians); `bench/plot.py` computes the same numbers from any JSON.
"""
import dataclasses
import gc
import importlib
import importlib.util
import os
import platform
import resource
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

# Without a GPU a fused kernel could only run in Triton's interpreter, which reads this variable when a kernel
# is defined; set it before anything imports `smoothsa.kernels` (the benchmarks never time that path on CPU).
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # One intra-op thread: these ops are too small to split, and split ops stall badly (here up to 50×) whenever
    # another process holds a core, because every parallel region waits for its slowest thread.
    torch.set_num_threads(1)

from smoothsa.evaluation import autocast  # noqa: E402  (after TRITON_INTERPRET)
from smoothsa.presets import Preset, get_preset  # noqa: E402
from smoothsa.trainer import RunOptions, Trainer  # noqa: E402


@dataclass(frozen=True)
class Workload:
    """One preset at one size, and the random batch it is timed on.

    Args:
        preset: preset name (`smoothsa.presets`).
        batch: B, images or clips per step.
        frames: T for video presets, None for images.
        boxes: S for box-conditioned presets (their slot count is the number of boxes); None: the preset's S.
        overrides: `ModelConfig` fields changed from the preset (the CPU smoke sizes).
    """

    preset: str
    batch: int
    frames: int | None = None
    boxes: int | None = None
    overrides: dict = field(default_factory=dict)

    def config(self, **model) -> Preset:
        """The preset with `overrides` and then `model` applied to its `ModelConfig`."""
        preset = get_preset(self.preset)
        preset.model = dataclasses.replace(preset.model, **(self.overrides | model))
        return preset

    @property
    def video(self) -> bool:
        return self.frames is not None

    @property
    def unit(self) -> str:
        return "frames" if self.video else "images"

    @property
    def images_per_batch(self) -> int:
        """Images (frames, for video) in one batch: the unit of the throughput numbers."""
        return self.batch * (self.frames or 1)

    @property
    def slots(self) -> int:
        return self.boxes if self.boxes is not None else get_preset(self.preset).model.num_slots

    def make_batch(self, device: torch.device, segment_channels: int | None = None, seed: int = 0) -> dict:
        """A random batch in the loaders' format (`smoothsa.dataio.loader`).

        Shapes: image (B, 3, R, R) | video (B, T, 3, R, R) float32 ~ N(0, 1) (like normalised pixels);
        bbox (B, T, S, 4) l < r, t < b in [0, 1] for box-conditioned presets; with `segment_channels` = C,
        segment (B, [T,] R, R, C) bool one-hot of blocky random regions (so the metrics are not degenerate).
        """
        preset = self.config()
        size = preset.model.image_size
        generator = torch.Generator().manual_seed(seed)
        lead = (self.batch, self.frames) if self.video else (self.batch,)
        batch = {"video" if self.video else "image": torch.randn(*lead, 3, size, size, generator=generator)}
        if preset.model.initializer == "mlp_preheated":
            corners = torch.rand(self.batch, self.frames or 1, self.slots, 2, 2, generator=generator)
            low, high = corners.min(dim=-1).values, corners.max(dim=-1).values  # (B, T, S, 2): x, y
            batch["bbox"] = torch.cat([low, high], dim=-1)  # (B, T, S, 4): l, t, r, b
        if segment_channels is not None:
            cells = torch.randint(0, segment_channels, (*lead, 1, 8, 8), generator=generator).float()
            index = torch.nn.functional.interpolate(cells.flatten(0, -4), size=(size, size), mode="nearest")
            index = index.reshape(*lead, size, size).long()  # (B, [T,] R, R)
            batch["segment"] = torch.nn.functional.one_hot(index, segment_channels).bool()
        return {k: v.to(device) for k, v in batch.items()}


@dataclass(frozen=True)
class EndToEnd:
    """The synthetic COCO-like data path: `images` JPEGs of height × width, loaded by `workers` processes
    (DALI: threads) into batches of `workload.batch`; a timed round is one epoch."""

    workload: Workload
    images: int
    height: int = 480
    width: int = 640
    workers: int = 1
    rounds: int = 2
    warmup_rounds: int = 1


@dataclass(frozen=True)
class Sizes:
    """All workload sizes of the suite, and how many rounds each benchmark times after its warm-up."""

    train: dict[str, Workload]
    eval: dict[str, Workload]
    end_to_end: EndToEnd
    rounds: int
    warmup_rounds: int


# A training step of the model is ~0.1 s on one CPU thread with these overrides (fp16 autocast on a CPU is several
# times slower: it has no fp16 matrix units).
CPU_MODEL = {"backbone": "patch", "image_size": 64, "grid": 8, "decoder_layers": 1}

if CUDA:
    SIZES = Sizes(
        train={
            "smoothsa_r-coco": Workload("smoothsa_r-coco", 32),
            "smoothsav_c-movi_c": Workload("smoothsav_c-movi_c", 8, frames=6, boxes=11),
        },
        # Validation batches of the presets; MOVi validation runs whole 24-frame videos.
        eval={
            "smoothsa_r-coco": Workload("smoothsa_r-coco", 32),
            "smoothsav_c-movi_c": Workload("smoothsav_c-movi_c", 8, frames=24, boxes=11),
        },
        end_to_end=EndToEnd(Workload("smoothsa_r-coco", 32), images=32 * 8, workers=8, rounds=3, warmup_rounds=1),
        rounds=20,
        warmup_rounds=5,  # torch.compile compiles in the first, CUDA graphs are recorded in the next ones
    )
else:
    SIZES = Sizes(
        train={
            "smoothsa_r-coco": Workload("smoothsa_r-coco", 2, overrides=CPU_MODEL),
            "smoothsav_c-movi_c": Workload("smoothsav_c-movi_c", 2, frames=3, boxes=4, overrides=CPU_MODEL),
        },
        eval={
            "smoothsa_r-coco": Workload("smoothsa_r-coco", 2, overrides=CPU_MODEL),
            "smoothsav_c-movi_c": Workload("smoothsav_c-movi_c", 2, frames=3, boxes=4, overrides=CPU_MODEL),
        },
        end_to_end=EndToEnd(
            Workload("smoothsa_r-coco", 2, overrides=CPU_MODEL), images=8, workers=1, rounds=2, warmup_rounds=1
        ),
        rounds=2,
        warmup_rounds=1,
    )


def _sizes_from_environment(sizes: Sizes) -> Sizes:
    """Overrides of the sizes above, for scripted runs (`bench/gpu.sh`):

    SMOOTHSA_BENCH_BATCH    B of the training-step workloads, "32" for all, or per preset
                            "smoothsa_r-coco=128,smoothsav_c-movi_c=32" (images, or clips for video)
    SMOOTHSA_BENCH_WORKERS  loader workers of the end-to-end runs
    SMOOTHSA_BENCH_ROUNDS   timed rounds of the training-step and evaluation benchmarks
    (and SMOOTHSA_BENCH_AMP, read by test_bench_end_to_end.py: its autocast dtype on CUDA)
    """
    batch = os.environ.get("SMOOTHSA_BENCH_BATCH")
    if batch:
        if "=" in batch:
            per_preset = {name: int(value) for name, value in (item.split("=") for item in batch.split(","))}
        else:
            per_preset = {name: int(batch) for name in sizes.train}
        train = {name: dataclasses.replace(w, batch=per_preset.get(name, w.batch)) for name, w in sizes.train.items()}
        sizes = dataclasses.replace(sizes, train=train)
    workers = os.environ.get("SMOOTHSA_BENCH_WORKERS")
    if workers:
        sizes = dataclasses.replace(sizes, end_to_end=dataclasses.replace(sizes.end_to_end, workers=int(workers)))
    rounds = os.environ.get("SMOOTHSA_BENCH_ROUNDS")
    if rounds:
        sizes = dataclasses.replace(sizes, rounds=int(rounds))
    return sizes


SIZES = _sizes_from_environment(SIZES)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def sizes() -> Sizes:
    return SIZES


def synchronize() -> None:
    """Waits for the GPU (a no-op on the CPU), so a timed round covers the work, not just its launch."""
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def sync():
    return synchronize


def device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name(DEVICE)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment() -> dict:
    """Where a result was measured: device, library versions, threads."""
    info = {
        "device": device_name(),
        "device_type": DEVICE.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "dali": _version("nvidia.dali"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if CUDA:
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(DEVICE).total_memory / 2**30, 1)
    return info


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None
    try:
        return importlib.import_module(module).__version__
    except (ImportError, AttributeError):
        return None


class TrainingStep:
    """`smoothsa.trainer.Trainer.step` (the step `smoothsa.train` runs) with its schedules frozen at the middle of
    training (lr past its warm-up, `detach_flag` off, so the preheat loss reaches `encode_project` as in 90 % of
    the steps).

    Args:
        preset: the preset (model, losses, optimiser settings).
        amp: "none" or "fp16" (with a GradScaler) or "bf16", as `smoothsa.trainer.RunOptions.amp`.
        compile_mode: None: eager; else torch.compile's mode ("reduce-overhead": CUDA graphs).

    `model` is the trained model; `check()` fails if a timed step was skipped as non-finite (it would time
    skipped updates), reading the counter once, after the timing.
    """

    def __init__(self, preset: Preset, amp: str, compile_mode: str | None = None):
        options = RunOptions(amp=amp, compile=compile_mode is not None, compile_mode=compile_mode or "default")
        self.trainer = Trainer(preset, options, DEVICE)
        self.model = self.trainer.model
        self.middle = preset.optim.total_steps // 2

    def __call__(self, batch: dict) -> None:
        self.trainer.step_count = self.middle
        self.trainer.step(batch)

    def check(self) -> None:
        skipped = int(self.trainer.bad_steps)
        if skipped:
            raise FloatingPointError(f"{skipped} timed steps had a non-finite loss: the benchmark timed skipped steps")


@pytest.fixture(scope="session")
def training_step():
    return TrainingStep


def assert_fused_runs(model, workload: Workload, preset: Preset) -> None:
    """Fails if slot attention would fall back to the reference at this shape under fp16 autocast (it would warn
    once and the row would time the wrong path)."""
    from smoothsa.kernels import fused_step_supported

    assert model.aggregat.fused, "the model was built with fused=True but its slot attention is not fused"
    tokens = preset.model.grid**2
    input = torch.empty(workload.batch, tokens, preset.model.feature_dim, device=DEVICE)  # (B, N, Dv)
    query = torch.empty(workload.batch, workload.slots, preset.model.slot_dim, device=DEVICE)  # (B, S, Ds)
    with autocast(DEVICE, "fp16"):
        reason = fused_step_supported(input, query)
    assert reason is None, f"the fused path would fall back to the reference: {reason}"


@pytest.fixture(scope="session")
def check_fused():
    return assert_fused_runs


class Recorder:
    """Fills `benchmark.extra_info`: the environment at once, then throughput and peak memory.

    `peak_memory_setup(warmup_rounds)` returns a `setup` callable for `benchmark.pedantic` that resets the CUDA
    peak-memory counter before the first timed round, so the recorded peak is the steady state (after compiling
    and recording CUDA graphs) of everything allocated: weights, optimizer state, activations and caches.
    On the CPU there is no per-benchmark counter; the process's maximum resident set is recorded instead.
    """

    def __init__(self, benchmark):
        self.benchmark = benchmark
        self.info = benchmark.extra_info
        self.info.update(environment())

    def peak_memory_setup(self, warmup_rounds: int):
        calls = {"n": 0}

        def setup():
            calls["n"] += 1
            if calls["n"] == warmup_rounds + 1 and CUDA:
                synchronize()
                torch.cuda.reset_peak_memory_stats(DEVICE)

        return setup

    def finish(self, images_per_round: int, unit: str = "images", **fields) -> float | None:
        """Records throughput (from the median round), peak memory and `fields`; returns images per second."""
        self.info.update(fields)
        self.info["unit"] = unit
        self.info["images_per_round"] = images_per_round
        stats = getattr(self.benchmark, "stats", None)
        median = stats.stats.median if stats is not None else None  # None under --benchmark-disable
        rate = images_per_round / median if median else None
        self.info["images_per_s"] = rate
        if CUDA:
            self.info["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(DEVICE) / 2**20, 1)
        else:
            self.info["peak_memory_mib"] = None
            self.info["host_max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1)
        return rate


@pytest.fixture
def record(benchmark) -> Recorder:
    return Recorder(benchmark)


@pytest.fixture(autouse=True)
def _release_memory():
    """Each benchmark starts from an empty cache and a fresh torch.compile state."""
    yield
    torch._dynamo.reset()
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def _load_plot():
    spec = importlib.util.spec_from_file_location("bench_plot", Path(__file__).with_name("plot.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Adds `speedup_vs_eager_fp32` / `speedup_vs_eager_fp16` (ratio of the group's medians) to each result."""
    speedups = _load_plot().speedups(output_json["benchmarks"])
    for entry in output_json["benchmarks"]:
        entry["extra_info"].update(speedups.get(entry["fullname"], {}))

"""The one evaluation loop: training's validation, `python -m smoothsa.eval` and the demo all score through
`evaluate`, so the number a run prints, the one in `metrics.json` and the one in the README are the same.

Noise: in eval mode the only random draw left is the initializer's noise. Sample i of a split gets its own
noise from `derive_seed(seed, i)`, so a score depends on neither the batch size nor the number of processes.

Distributed: every process scores its shard; sums and counts (never means) are all-reduced. The sampler pads
each shard by wrapping around; those repeated samples are dropped before the forward, so each sample counts
once and the result equals a single-process run.
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from smoothsa.data import LoaderOptions, build_loader
from smoothsa.dataio.epochs import to_device
from smoothsa.dataio.transforms import derive_seed
from smoothsa.metrics import segments_from_attention
from smoothsa.presets import Preset
from smoothsa.tasks import Task


def loader_for(preset: Preset, data, split: str, batch_size: int, training: bool, workers: int = 0,
               backend: str = "torch", seed: int = 0, rank: int = 0, world_size: int = 1,
               device: torch.device | None = None, keys: tuple[str, ...] | None = None):
    """The loader of one split of `data` for this process (training: shuffled, augmented, last batch dropped).

    keys: the batch keys to carry (training: the task's `train_keys`; None: every key the reader produces).
    """
    device_id = None
    if device is not None and device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    options = LoaderOptions(batch_size=batch_size, workers=workers, backend=backend, seed=seed, rank=rank,
                            world_size=world_size, device_id=device_id, pin_memory=device_id is not None, keys=keys)
    return build_loader(preset, data, split, options, is_training=training)


def autocast(device: torch.device, amp: str):
    """The forward's autocast context: amp "fp16", "bf16" or "none"."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def sample_noise(seed: int, indices: list[int], shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(B, S, Ds) N(0, 1) noise, sample `indices[b]`'s from its own generator, one slot row at a time, so a
    sample's first slots get the same noise whatever the batch pads S to."""
    slots, dim = shape
    rows = []
    for index in indices:
        generator = torch.Generator().manual_seed(derive_seed(seed, index))
        rows.append(torch.stack([torch.randn(dim, generator=generator) for _ in range(slots)]))
    return torch.stack(rows).to(device, non_blocking=True)


class SplitMean:
    """Per-name sums and counts of valid (non-NaN) values, kept on the device; `compute` reads them once."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sums[name] = self.sums.get(name, zero) + total.double()
        self.counts[name] = self.counts.get(name, zero) + count.double()

    def update(self, values: dict[str, torch.Tensor]) -> None:
        """values: name -> per-sample (or per-object) values of any shape, NaN = invalid."""
        for name, value in values.items():
            value = value.detach().double().flatten()
            valid = ~value.isnan()
            self.add(name, torch.where(valid, value, 0.0).sum(), valid.sum())

    def all_reduce(self) -> None:
        """Sums every process's sums and counts (names are aligned first: a process may have seen none)."""
        names: list = [None] * dist.get_world_size()
        dist.all_gather_object(names, sorted(self.sums))
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        keys = sorted(set().union(*names))
        stacked = torch.stack([self.sums.get(k, zero) for k in keys] + [self.counts.get(k, zero) for k in keys])
        dist.all_reduce(stacked)
        self.sums = dict(zip(keys, stacked[: len(keys)]))
        self.counts = dict(zip(keys, stacked[len(keys) :]))

    def compute(self, counts: dict[str, str]) -> dict[str, float | int]:
        """Means (NaN where nothing was valid), and `counts`: result name -> the metric whose valid count it is."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        values = torch.stack([self.sums[k] for k in keys] + [self.counts[k] for k in keys]).tolist()  # host sync
        sums, numbers = dict(zip(keys, values[: len(keys)])), dict(zip(keys, values[len(keys) :]))
        result: dict[str, float | int] = {k: sums[k] / numbers[k] if numbers[k] else math.nan for k in keys}
        result |= {name: int(numbers.get(source, 0)) for name, source in counts.items()}
        return result


_said: set[str] = set()


def say_once(message: str) -> None:
    """Prints `message` the first time this process is told it (validations repeat; the note need not)."""
    if message not in _said:
        _said.add(message)
        print(message, flush=True)


def picture_segments(task: Task, batch: dict, output) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """What `smoothsa.visualize` draws of a batch: pixels (B, [T,] 3, H, W), the ground-truth segments
    (B, [T,] H, W, C) or None (data without ground truth: a blank column) and the predicted ones (B, [T,] H, W, S)."""
    pixels = batch[task.pixels]
    pred = segments_from_attention(task.attention(output).float(), tuple(pixels.shape[-2:]))
    return pixels, batch.get("segment"), pred


@dataclass
class Evaluation:
    """results: name -> mean over the split (and counts); first: (batch, output) of the first batch, or None."""

    results: dict
    first: tuple | None


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, loader, device: torch.device, seed: int,
             official_compat: bool = False, amp: str = "none", with_losses: bool = False,
             keep_first: bool = False) -> Evaluation:
    """Scores `model` on every sample of `loader`'s split once (see the module docstring).

    Args:
        model: the model (not a DistributedDataParallel wrapper: processes may run different batch counts).
        task: `smoothsa.tasks.task_for(preset)`.
        loader: the split's loader (unshuffled) for this process; `loader.options.rank` / `world_size` say its shard.
        device: where the model is.
        seed: the noise seed (training's validation uses the preset's `optim.seed`, as does `eval` by default).
        official_compat: official metric arithmetic and recognition matching (docs/official.md §10).
        amp: autocast of the forward ("fp16", "bf16", "none"); metrics are computed outside it.
        with_losses: also report `loss_<name>`, each the sample-weighted mean of the batch losses. A split
            without ground-truth segments (folder data) reports only these, whatever `with_losses` says.
        keep_first: keep the first batch and its output (pictures).
    """
    was_training = model.training
    model.eval()
    task.set_official_compat(model, official_compat)
    total = len(loader.dataset)
    rank, world_size = loader.options.rank, loader.options.world_size
    mean = SplitMean(device)
    first = None
    seen = 0
    for batch in loader:
        size = len(next(v for v in batch.values() if torch.is_tensor(v)))
        positions = [rank + (seen + i) * world_size for i in range(size)]  # in the split's padded order
        seen += size
        keep = sum(p < total for p in positions)  # the padding is at the end of the last shard batches
        if keep == 0:
            continue
        if keep < size:
            batch = {k: v[:keep] for k, v in batch.items()}
        batch = to_device(batch, device)
        shape = task.noise_shape(batch)
        if shape is not None:
            batch["init_noise"] = sample_noise(seed, positions[:keep], shape, device)
        scored = "segment" in batch  # folder data (`data.dataset=folder`) has no ground truth: losses only
        if device.type == "cuda":
            # Once training marks its steps, CUDA graphs start a new generation only when marked: each batch is
            # one (its outputs are used up within it), else every batch would record a graph nested in the last.
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, amp):
            out = task.forward(model, batch)
            terms = task.losses(out, batch) if with_losses or not scored else {}
        if scored:
            mean.update(task.metrics(out, batch, official_compat))
        else:
            say_once(f"no ground-truth segments in {loader.dataset.location}: validation reports the losses only")
        if terms:
            weight = torch.full((), float(keep), dtype=torch.float64, device=device)
            valid = task.valid(out)
            if valid is not None:
                weight = weight * valid
            for name, value in terms.items():
                mean.add(f"loss_{name}", value.detach().double() * weight, weight)
        if keep_first and first is None:
            first = (batch, copy.deepcopy(out))  # the outputs of a CUDA graph are overwritten by its next replay
    if world_size > 1:
        mean.all_reduce()
    model.train(was_training)
    return Evaluation(mean.compute(task.counts), first)

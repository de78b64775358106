"""torch.compile on every model kind: no graph breaks in the training forward and losses, and no recompiles in
steady state (same shapes; box-conditioned video with a new slot count every batch; back and forth between
training and validation).

Tiny models on the CPU. `torch._dynamo.explain` traces forward + losses without compiling them; the recompile
tests compile through a counter that sees every graph dynamo hands to the backend (`eager`, or `aot_eager` where
AOTAutograd must trace the backward with a symbolic slot count): a graph break or a recompile would show as a
second graph.
"""
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

from smoothsa import build_model, compile_model
from smoothsa.presets import get_preset
from smoothsa.tasks import task_for
from smoothsa.trainer import RunOptions, Trainer

TINY = {"backbone": "patch", "image_size": 32, "grid": 4, "decoder_layers": 1, "feature_dim": 32, "slot_dim": 32}
DISCOVERY = ["smoothsa_r-coco", "spot_r-coco", "smoothsav_c-movi_c", "smoothsav_r-ytvis"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _tiny(name: str, **model):
    preset = get_preset(name)
    preset.model = dataclasses.replace(preset.model, **(TINY | model))
    torch.manual_seed(0)
    return preset, build_model(preset.model).train()


def _batch(preset, slots: int = 3, seed: int = 0) -> dict:
    """A random batch in the loaders' format: 2 images or 2 clips of 3 frames; boxes (l < r, t < b) for
    box-conditioned video and for recognition; segments and classes for recognition (`slots` objects)."""
    generator = torch.Generator().manual_seed(seed)
    size = preset.model.image_size
    video = preset.model.arch == "smoothsa_video"
    lead = (2, 3) if video else (2,)
    batch = {"video" if video else "image": torch.randn(*lead, 3, size, size, generator=generator)}
    if preset.model.initializer == "mlp_preheated" or preset.model.arch == "recognition":
        corners = torch.rand(*lead, slots, 2, 2, generator=generator)
        batch["bbox"] = torch.cat([corners.min(-1).values, corners.max(-1).values], -1)  # (…, S, 4)
    if preset.model.arch == "recognition":
        index = torch.randint(0, slots + 1, (*lead, size // 4, size // 4), generator=generator)
        index = index.repeat_interleave(4, -1).repeat_interleave(4, -2)  # blocks, so some slots match objects
        batch["segment"] = torch.nn.functional.one_hot(index, slots + 1).bool()  # (…, H, W, R+1)
        batch["clazz"] = torch.randint(1, 5, (*lead, slots), generator=generator)
    return batch


def _train_step(model, batch, preset) -> None:
    task = task_for(preset)
    terms = task.losses(task.forward(model, batch), batch)
    assert terms is not None, "no slot matched an object: the batch does not exercise the probe"
    sum(terms.values()).backward()


def _breaks(explanation) -> str:
    return "\n".join(f"{r.reason.splitlines()[0]} at {r.user_stack[-1:] if r.user_stack else '?'}"
                     for r in explanation.break_reasons)  # fmt: skip


class HostReads(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (`.item()`, `bool(t)`, `int(t)`, `.tolist()`)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", DISCOVERY)
def test_training_forward_and_backward_read_nothing_on_the_host(name):
    preset, model = _tiny(name)
    batch = _batch(preset)
    with HostReads() as reads:
        _train_step(model, batch, preset)
    assert reads.count == 0


@pytest.mark.parametrize("name", DISCOVERY)
def test_training_forward_and_losses_trace_as_one_graph(name):
    preset, model = _tiny(name)
    batch = _batch(preset)

    def loss(batch):
        task = task_for(preset)
        return sum(task.losses(task.forward(model, batch), batch).values())

    explanation = torch._dynamo.explain(loss)(batch)
    assert explanation.graph_break_count == 0, _breaks(explanation)
    assert explanation.graph_count == 1


def test_recognition_discovery_traces_as_one_graph():
    """The compiled part of a recognition model (`compile_model`): the frozen discovery model, in training mode
    and under inference mode as the probe runs it."""
    preset, model = _tiny("smoothsa_r_recogn-coco")
    with torch.inference_mode():
        explanation = torch._dynamo.explain(model.discov)(_batch(preset)["image"])
    assert explanation.graph_break_count == 0, _breaks(explanation)
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", ["smoothsa_r-coco", "spot_r-coco", "smoothsa_r_recogn-coco"])
def test_steady_state_steps_do_not_recompile(name):
    """Video: `test_box_slot_count_is_dynamic` (the same model with boxes)."""
    preset, model = _tiny(name)
    counter = CompileCounterWithBackend("eager")
    keys = list(model.state_dict())
    assert compile_model(model, backend=counter) is model
    assert list(model.state_dict()) == keys  # compiled in place: the official checkpoint keys
    for seed in range(3):  # new values, same shapes
        _train_step(model, _batch(preset, seed=seed), preset)
        assert counter.frame_count == 1, f"step {seed}: {counter.frame_count} graphs compiled"
    assert not torch._dynamo.utils.counters["graph_break"]
    assert sum(p.grad is not None for p in model.parameters()) > 0  # the backward ran through the compiled graph


def test_box_slot_count_is_dynamic():
    """MOVi: S is the batch's padded box count. One graph, fused slot attention included, serves S = 3, 4 and 5
    (traced by AOTAutograd, forward and backward, with a symbolic S)."""
    preset, model = _tiny("smoothsav_c-movi_c", fused=True)
    counter = CompileCounterWithBackend("aot_eager")
    compile_model(model, backend=counter)
    for seed, slots in enumerate((3, 4, 5)):
        _train_step(model, _batch(preset, slots=slots, seed=seed), preset)
        assert counter.frame_count == 1, f"S = {slots}: {counter.frame_count} graphs compiled"
    assert not torch._dynamo.utils.counters["graph_break"]


def test_validation_compiles_once_beside_training():
    """eval() + no_grad is a second graph, compiled once; training and validation then alternate without
    recompiling."""
    preset, model = _tiny("smoothsa_r-coco")
    counter = CompileCounterWithBackend("eager")
    compile_model(model, backend=counter)
    for round in range(2):
        model.train()
        _train_step(model, _batch(preset, seed=round), preset)
        model.eval()
        with torch.no_grad():
            batch = _batch(preset, seed=round)
            task_for(preset).losses(task_for(preset).forward(model, batch), batch)
        assert counter.frame_count == 2, f"round {round}: {counter.frame_count} graphs compiled"


class Split:
    """What `smoothsa.evaluation.evaluate` reads of a loader: its batches, the split's size, the shard."""

    def __init__(self, batches: list[dict]):
        self.batches = batches
        self.dataset = range(sum(len(next(iter(batch.values()))) for batch in batches))
        self.options = SimpleNamespace(rank=0, world_size=1)

    def __iter__(self):
        return iter(self.batches)


def _scored(preset, slots: int, seed: int) -> dict:
    """`_batch` with the segments the metrics read: every pixel in object 1 of `slots` (and the background)."""
    batch = _batch(preset, slots=slots, seed=seed)
    if "segment" not in batch:
        pixels = batch["video" if "video" in batch else "image"]
        index = torch.randint(0, slots + 1, (*pixels.shape[:-3], *pixels.shape[-2:]))
        batch["segment"] = torch.nn.functional.one_hot(index, slots + 1).bool()
    return batch


@pytest.mark.parametrize("name", ["smoothsa_r-coco", "spot_r-coco", "smoothsav_c-movi_c", "smoothsa_r_recogn-coco"])
def test_trainer_steps_and_validation_compile_two_graphs(name):
    """Through `Trainer` (`RunOptions(compile=True)`): training steps (MOVi: a new box count every batch), a
    validation, more steps and another validation compile one training graph and one validation graph (the
    recognition model: of its discovery model), with no graph break."""
    preset, _ = _tiny(name)
    counter = CompileCounterWithBackend("eager")  # AOTAutograd with a symbolic S: test_box_slot_count_is_dynamic
    trainer = Trainer(preset, RunOptions(amp="none", compile=True, compile_backend=counter, workers=0), "cpu")
    assert not any("_orig_mod" in key for key in trainer.model.state_dict())  # compiled in place
    trainer.step_count = 5  # past the warm-up
    slot_counts = iter([3, 4, 5, 3, 6] if preset.model.initializer == "mlp_preheated" else [3] * 5)
    val = Split([_scored(preset, 3, seed) for seed in (10, 11)])
    for steps, graphs in ((3, 1), (2, 2)):  # the second round's steps reuse the training graph
        for _ in range(steps):
            trainer.step(_batch(preset, slots=next(slot_counts), seed=trainer.step_count))
            assert counter.frame_count == graphs, f"step {trainer.step_count}: {counter.frame_count} graphs compiled"
        results = trainer.validate(val).results
        assert counter.frame_count == 2, f"validation: {counter.frame_count} graphs compiled"
    assert results and not torch._dynamo.utils.counters["graph_break"]
    assert int(trainer.bad_steps) == 0


DDP_RANK = """
import dataclasses, json, sys
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from smoothsa.presets import get_preset
from smoothsa.trainer import RunOptions, Trainer
sys.path.insert(0, sys.argv[1])
from test_compile import TINY, _batch

name = sys.argv[2]
preset = get_preset(name)
preset.model = dataclasses.replace(preset.model, **TINY)
counter = CompileCounterWithBackend("eager")
trainer = Trainer(preset, RunOptions(amp="none", compile=True, compile_backend=counter, workers=0), "cpu")
trainer.step_count = 5
for seed in range(3):  # every rank its own batch
    trainer.step(_batch(preset, seed=10 * seed + trainer.dist.rank))
weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
breaks = [line.strip() for reason in torch._dynamo.utils.counters["graph_break"]
          for line in str(reason).splitlines() if "Explanation" in line]
print(json.dumps({"graphs": counter.frame_count, "breaks": breaks, "sum": weights.double().sum().item(),
                  "wrapped": type(trainer.net).__name__}))
trainer.dist.close()
"""


@pytest.mark.slow
@pytest.mark.parametrize("name, wrapped", [("smoothsa_r-coco", "OptimizedModule"),
                                           ("smoothsa_r_recogn-coco", "DistributedDataParallel")])
def test_ddp_compiles_without_graph_breaks_and_keeps_the_ranks_equal(name, wrapped, tmp_path):
    """Two CPU processes (gloo): a discovery model compiled around DDP, a recognition model compiled in place
    inside DDP. The model is one training graph; the only graph breaks are in DDP's own forward (its bookkeeping
    runs eagerly, by dynamo's design; the module inside is traced, split at DDP's buckets); both ranks hold the
    same weights after three steps on different batches."""
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(__file__)
    env = os.environ | {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29600 + len(name)),
                        "OMP_NUM_THREADS": "1"}  # fmt: skip
    ranks = [subprocess.Popen([sys.executable, "-c", DDP_RANK, here, name], env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for r in range(2)]  # fmt: skip
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), "\n".join(err[-3000:] for _, err in outputs)
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    ddp_forward = ("DistributedDataParallel._inside_ddp_forward", "set_runtime_stats_and_log")  # DDP's own code
    for result in results:
        assert result["graphs"] == 1 and result["wrapped"] == wrapped, result
        assert all(any(name in why for name in ddp_forward) for why in result["breaks"]), result["breaks"]
    assert results[0]["sum"] == results[1]["sum"]

"""Training as a library (docs/official.md §4): `Trainer` owns the model, the optimizer, the GradScaler, the
schedules and the run's position; `Trainer.step` is one optimizer step, `Trainer.fit` the loop.

    trainer = Trainer(preset, RunOptions(amp="none"))
    trainer.load_initial_weights(discovery="runs/coco/last.pth")   # recognition presets
    results = trainer.fit(train_loader, val_loader, out="runs/probe")

`step` reads no value on the host (a recognition step copies what its Hungarian matching needs: the IoU matrix,
and with `official_compat` the mask's values). A non-finite loss (or gradient) is skipped on the device, by the
fused Adam's `found_inf` input, and counted in device tensors that are read only when the loop logs or validates.
"""
import csv
import dataclasses
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from smoothsa import runs, schedules, visualize
from smoothsa.build import build_model, compile_model
from smoothsa.checkpoint import load_official, official_state_dict
from smoothsa.cli import Diverged, UserError, resolve_device
from smoothsa.dataio import default_workers
from smoothsa.dataio.epochs import to_device
from smoothsa.evaluation import Evaluation, autocast, evaluate, loader_for, picture_segments
from smoothsa.presets import Preset, validate
from smoothsa.pretrained import RANDOM_BANNER, BackboneWeightsError, resolve_backbone_weights
from smoothsa.recognition import ObjDiscovRecogn
from smoothsa.slot_attention import SlotAttention
from smoothsa.state import atomic_save, atomic_write_text, load_training_state, rng_state, save_checkpoint, set_rng_state
from smoothsa.tasks import task_for


@dataclass
class RunOptions:
    """How to run (not what to train: that is the preset).

    amp: "fp16" (with a GradScaler), "bf16" or "none"; "auto" = fp16 on CUDA, none on CPU.
    compile: torch.compile the model; None = on for CUDA, off for CPU.
    compile_mode: torch.compile's mode: "default", "reduce-overhead" (CUDA graphs; each step then starts a new
        one) or "max-autotune".
    compile_backend: torch.compile's backend (tests: "eager", "aot_eager" or a counting backend).
    backend: data loader, one of `smoothsa.dataio.BACKENDS` ("torch", "torch-gpu", "dali").
    workers: loader workers (DALI: threads) per process; default `smoothsa.dataio.default_workers()`.
    max_bad_steps: consecutive non-finite losses tolerated before stopping (checked when the loop logs).
    log_every: steps between logged lines (each costs a host sync).
    official_compat: the official metric arithmetic and recognition matching, in training and validation
        (docs/official.md §10.1, §10.2, §10.13).
    """

    amp: str = "auto"
    compile: bool | None = None
    compile_mode: str = "default"
    compile_backend: str | Callable = "inductor"
    backend: str = "torch"
    workers: int = dataclasses.field(default_factory=default_workers)
    max_bad_steps: int = 20
    log_every: int = 20
    official_compat: bool = False


class Distributed:
    """torchrun's environment: rank, world size, this process's device ("cuda" = the local rank's GPU)."""

    def __init__(self, device: str | torch.device | None = None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(None if device is None else str(device), self.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def detach_flags(model: torch.nn.Module) -> list[torch.Tensor]:
    """The `detach_flag` buffers of the preheated initializers in `model`."""
    return [m.detach_flag for m in model.modules() if torch.is_tensor(getattr(m, "detach_flag", None))]


def set_detach_flag(model: torch.nn.Module, value: bool) -> None:
    for flag in detach_flags(model):
        flag.fill_(value)


def gradient_norm(parameters: list[torch.Tensor], optim) -> torch.Tensor:
    """Clips the gradients as the preset says and returns their total norm (a device tensor; non-finite when
    any gradient is). Without clipping the norm is still computed: it is the non-finite check."""
    norm_type = math.inf if optim.clip_type == "inf" else 2.0
    if optim.clip_norm is None:
        return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None], norm_type)
    return torch.nn.utils.clip_grad_norm_(parameters, optim.clip_norm, norm_type=norm_type)


class Logger:
    """CSV always; TensorBoard event files (scalars and the slot picture) when `tensorboard` is installed.
    Rank 0 only."""

    def __init__(self, out: Path | None, enabled: bool, step: int = 0):
        """step: where the run starts; a resumed run's TensorBoard drops the events logged after it."""
        self.enabled = enabled and out is not None
        self.path = out / runs.LOG if out is not None else None
        self.writer = None
        if self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)
            except ImportError:
                pass

    def log(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "split", "name", "value"])
            for name, value in values.items():
                writer.writerow([step, split, name, f"{value:.6g}" if isinstance(value, float) else value])
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{split}/{name}", value, step)
            self.writer.flush()

    def picture(self, step: int, name: str, image: np.ndarray) -> None:
        """image (H, W, 3) uint8."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(name, image, step, dataformats="HWC")
            self.writer.flush()


class Trainer:
    """One training run of `preset`: model, optimizer, scaler, schedules and the run's position.

    Args:
        preset: what to train.
        options: how to run (`RunOptions`).
        device: "cpu", "cuda" (this process's GPU), "cuda:1", …; None: this process's GPU, else the CPU.

    Attributes the run-folder logic uses:
        out: the run folder (set by `fit`), where `save_state` / `save_checkpoint` write.
        step_count, epoch, batch_in_epoch: where the run is (optimizer steps taken, data position).
        after_step: callables `f(trainer)` run after every step, at a point where `save_state` captures a
            state that resumes exactly (periodic and signal-triggered saves go here).
        after_checkpoint: callables `f(trainer, path)` run after each checkpoint is written.
        stop_reason: set it (e.g. from a signal handler or an `after_step` hook) and `fit` saves the state and
            returns after the current step; `finished` says whether the run reached `total_steps`.
        state_saved_at: the step whose state `save_state` wrote last (None: none yet).
    """

    def __init__(self, preset: Preset, options: RunOptions | None = None, device: str | torch.device | None = None):
        options = options or RunOptions()
        self.preset = preset
        self.options = options
        self.dist = Distributed(device)
        self.device = device = self.dist.device
        optim = preset.optim
        self.amp = options.amp if options.amp != "auto" else ("fp16" if device.type == "cuda" else "none")
        if self.amp not in ("fp16", "bf16", "none"):
            raise ValueError(f"amp must be fp16, bf16, none or auto, got {options.amp!r}")
        validate(preset)  # a preset built in code has not met `apply_overrides`' checks
        self.use_compile = options.compile if options.compile is not None else device.type == "cuda"
        seed_everything(optim.seed + self.dist.rank)

        self.task = task_for(preset)
        self.model = build_model(preset.model, backbone=True).to(device)
        self.task.set_official_compat(self.model, options.official_compat)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        # Fused: its step takes `found_inf`, so a non-finite step is skipped on the device.
        self.optimizer = torch.optim.Adam(self.parameters, lr=optim.lr, fused=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")
        # Found once: the step sets them without walking the model's modules.
        self.detach_flags = detach_flags(self.model) if "preheat" in optim.loss_weights else []

        self.step_count = self.epoch = self.batch_in_epoch = 0
        self.bad_steps = torch.zeros((), dtype=torch.int64, device=device)  # non-finite losses, all told
        self.bad_in_row = torch.zeros((), dtype=torch.int64, device=device)
        self.worst_bad_run = torch.zeros((), dtype=torch.int64, device=device)
        self.initial_weights: dict[str, str] = {}

        self.net, self.eval_net = self._wrap(self.model)
        # both modes record CUDA graphs (inductor's `triton.cudagraphs`)
        self.cudagraphs = self.use_compile and options.compile_mode in ("reduce-overhead", "max-autotune")

        self.out: Path | None = None
        self.after_step: list[Callable[["Trainer"], None]] = []
        self.after_checkpoint: list[Callable[["Trainer", Path], None]] = []
        self.stop_reason: str | None = None
        self.finished = False
        self.state_saved_at: int | None = None  # the step of the last `save_state`
        self.results: dict = {}
        self.clock = time.perf_counter

    def _wrap(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(training net, validation net): `model` compiled, and wrapped in DDP for training when there are
        several processes. Validation runs the model without the DDP wrapper: processes may score different
        numbers of batches.

        One process, or a recognition model: compiled in place (`compile_model`: the state_dict keeps its keys;
        a recognition model compiles its frozen discovery model only, as the matching runs on the host), so
        training and validation share the compiled model (train() and eval() are one graph each). A discovery
        model under DDP is compiled around the DDP wrapper, as torch recommends: DDP's own bookkeeping runs
        eagerly (dynamo breaks the graph in DDP's forward by design) and the model inside is one graph, which
        dynamo splits at DDP's gradient buckets so that their all-reduce overlaps the backward.
        """
        compiling = {"mode": self.options.compile_mode, "backend": self.options.compile_backend}
        around_ddp = self.dist.world_size > 1 and not isinstance(model, ObjDiscovRecogn)
        if self.use_compile and not around_ddp:
            compile_model(model, **compiling)
        if self.dist.world_size == 1:
            return model, model
        device = self.device
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if self.use_compile and around_ddp:
            return torch.compile(net, **compiling), torch.compile(model, **compiling)
        return net, model

    # -- initial weights ------------------------------------------------------------------------------------

    def load_initial_weights(self, **checkpoints: str | os.PathLike | None) -> None:
        """The one place a new run's starting weights come from: `name=path` for each checkpoint the task
        starts from (`task.initial_weights`, e.g. recognition's `discovery`). A resumed run skips this."""
        given = {name: path for name, path in checkpoints.items() if path is not None}
        for name in given:
            if name not in self.task.initial_weights:
                raise UserError(f"{self.preset.name} does not start from a {name} checkpoint: drop --{name}-ckpt")
        for name in self.task.initial_weights:
            if name not in given:
                raise UserError(f"{self.preset.name} starts from a trained {name} model: pass --{name}-ckpt PATH")
        for name, path in given.items():
            self.task.load_initial_weights(self.model, name, path)
            self.initial_weights[name] = os.fspath(path)

    # -- one step -------------------------------------------------------------------------------------------

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One optimizer step on one batch: lr and detach-flag schedules, forward and losses under autocast,
        scaled backward, unscale, clipping, Adam, scaler update. Returns the weighted loss terms (device
        tensors). A step whose loss or gradients are not finite, or whose batch the task finds invalid, leaves
        the weights and Adam's state as they were; it still counts as a step (as the official GradScaler skip)."""
        optim = self.preset.optim
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        lr = schedules.linear_warmup_cosine(self.step_count, optim.total_steps, optim.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.detach_flags:
            detach = schedules.detach_flag(self.step_count, optim.total_steps, optim.preheat_detach)
            for flag in self.detach_flags:
                flag.fill_(detach)
        batch = to_device({k: batch[k] for k in self.task.train_keys}, self.device)
        with autocast(self.device, self.amp):
            out = self.task.forward(self.net, batch)
            terms = self.task.losses(out, batch)
        loss = sum(terms.values())
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = gradient_norm(self.parameters, optim)
        bad = ~torch.isfinite(loss.detach())
        skip = bad | ~torch.isfinite(norm)
        valid = self.task.valid(out)
        if valid is not None:
            bad = bad & valid
            skip = skip | ~valid
        if self.dist.world_size > 1:
            # A batch is bad or invalid on one rank only: every rank skips with it, or the replicas would part,
            # and counts it, so that all stop together. On the device: no host sync.
            flags = torch.stack([bad, skip]).to(torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad, skip = flags.bool().unbind()
        # The protocol by which GradScaler hands the fused Adam its skip flag: the step then changes nothing.
        self.optimizer.found_inf = skip.float()
        self.optimizer.step()
        del self.optimizer.found_inf
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += bad
        self.bad_in_row = (self.bad_in_row + 1) * bad
        self.worst_bad_run = torch.maximum(self.worst_bad_run, self.bad_in_row)
        self.step_count += 1
        return {name: value.detach() for name, value in terms.items()}

    def check_bad_steps(self) -> int:
        """Reads the skip counters (a host sync); raises once more than `max_bad_steps` came in a row."""
        return self.read_logged({})[1]

    def read_logged(self, terms: dict[str, torch.Tensor]) -> tuple[dict[str, float], int]:
        """The loss terms of a step and the skip count, in one host transfer (the sync of a logging step);
        raises once more than `max_bad_steps` non-finite steps came in a row."""
        counters = [self.worst_bad_run.double(), self.bad_steps.double()]
        *losses, worst, total = torch.stack([v.double() for v in terms.values()] + counters).tolist()
        if worst > self.options.max_bad_steps:
            raise Diverged(
                f"{int(worst)} consecutive steps had a non-finite loss (by step {self.step_count}); stopping. "
                "Those steps left the weights as they were. Lower optim.lr or use --amp bf16/none."
            )
        return dict(zip(terms, losses)), int(total)

    # -- state ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resume needs: weights (official layout, copied to the host), optimizer and scaler state
        (references to the live tensors, as `torch.optim.Optimizer.state_dict`), position, counters, RNG."""
        return {
            "model": {k: v.detach().to("cpu", copy=True) for k, v in official_state_dict(self.model).items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step_count,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": rng_state(),
            "extra": {"bad_steps": int(self.bad_steps), "bad_in_row": int(self.bad_in_row),
                      "worst_bad_run": int(self.worst_bad_run)},
        }

    def load_state_dict(self, state: dict) -> None:
        load_official(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step_count, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        extra = state["extra"]
        for name in ("bad_steps", "bad_in_row", "worst_bad_run"):
            getattr(self, name).fill_(extra.get(name, 0))
        set_rng_state(state["rng"])

    def save_state(self) -> Path | None:
        """Writes `out/state.pt` atomically (rank 0); other ranks write nothing. Call it between steps."""
        if self.out is None or not self.dist.main:
            return None
        path = atomic_save(self.state_dict(), self.out / runs.STATE)
        self.state_saved_at = self.step_count
        return path

    def save_checkpoint(self, name: str) -> Path | None:
        """Writes the weights in the official layout to `out/name` (rank 0), then runs `after_checkpoint`."""
        if self.out is None or not self.dist.main:
            return None
        path = save_checkpoint(self.model, self.out / name)
        for hook in self.after_checkpoint:
            hook(self, path)
        return path

    def config(self) -> dict:
        """What config.json records: the resolved preset, the run options and the initial weights."""
        backend = self.options.compile_backend  # a name, or (tests) a backend function
        options = dataclasses.asdict(self.options) | {"compile_backend": backend if isinstance(backend, str) else repr(backend)}
        return runs.run_config(self.preset, options) | {"initial_weights": dict(self.initial_weights)}

    # -- validation and the loop ----------------------------------------------------------------------------

    def validate(self, loader, keep_first: bool = False) -> Evaluation:
        """Losses and metrics over the whole validation split (`smoothsa.evaluation.evaluate`), with the
        preset's seed: the same numbers `python -m smoothsa.eval` gives for the same weights."""
        return evaluate(self.eval_net, self.task, loader, self.device, self.preset.optim.seed,
                        self.options.official_compat, self.amp, with_losses=True, keep_first=keep_first)

    def _fused_kernels(self) -> str:
        """Whether slot attention runs its fused kernels here (the banner's words): "on", "off" (turned off), or
        "off (why they cannot run: e.g. CPU tensors without TRITON_INTERPRET=1)"."""
        if not any(m.fused for m in self.model.modules() if isinstance(m, SlotAttention)):
            return "off"
        from smoothsa.kernels import fused_step_supported

        config = self.preset.model
        tokens = torch.empty(1, config.grid**2, config.feature_dim, device=self.device)  # (B, N, Dv)
        query = torch.empty(1, config.num_slots or 1, config.slot_dim, device=self.device)  # (B, S, Ds)
        with autocast(self.device, self.amp):
            reason = fused_step_supported(tokens, query)
        return "on" if reason is None else f"off ({reason})"

    def _picture(self, first) -> np.ndarray:
        pixels, segment, pred = picture_segments(self.task, *first)
        if pixels.dim() == 5:  # video: the frames of the first clip, one per row
            pixels, pred = pixels[0], pred[0]
            segment = None if segment is None else segment[0]
        return visualize.grid_array(pixels, segment, pred, most=8)

    def fit(self, train_loader, val_loader, out: str | os.PathLike | None = None) -> dict:
        """Trains until `total_steps` (or `stop_reason` is set), validating `optim.validations` times, writing
        checkpoints after the validations of the second half, `state.pt` after each, and at the end
        `last.pth` and `metrics.json` into `out`. Returns the last validation's results."""
        optim = self.preset.optim
        total = optim.total_steps
        main = self.dist.main
        self.out = Path(out) if out is not None else None
        if main and self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        if len(train_loader) == 0:
            raise ValueError(f"the training split has fewer samples than one batch ({optim.batch_size})")
        val_interval = max(1, total // optim.validations)
        logger = Logger(self.out, main, self.step_count)
        if main:
            print(f"{self.preset.name}: {total} steps, batch {optim.batch_size} per process × {self.dist.world_size} = "
                  f"{optim.batch_size * self.dist.world_size} global, device {self.device}, amp {self.amp}, "
                  f"compile {self.use_compile}, fused kernels {self._fused_kernels()}", flush=True)
        train_loader.set_epoch(self.epoch, skip_batches=self.batch_in_epoch)
        progress = tqdm(total=total, initial=self.step_count, disable=not main, dynamic_ncols=True, desc=self.preset.name)
        trained, started, images = 0.0, self.clock(), 0  # training time only: validations are left out
        self.net.train()
        try:
            while self.step_count < total and self.stop_reason is None:
                for batch in train_loader:
                    self.batch_in_epoch += 1
                    terms = self.step(batch)
                    images += batch[self.task.pixels].shape[0] * self.dist.world_size
                    progress.update(1)
                    step = self.step_count
                    if step % self.options.log_every == 0 or step == total:
                        # Sync point: reading the losses, once every log_every steps.
                        values, skipped = self.read_logged(terms)
                        now = self.clock()
                        rate = images / max(trained + now - started, 1e-9)
                        lr = self.optimizer.param_groups[0]["lr"]
                        values |= {"loss": sum(values.values()), "lr": lr, "images_per_s": rate, "skipped_steps": skipped}
                        progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                        logger.log(step, "train", values)
                        trained, started, images = 0.0, now, 0
                    if step % val_interval == 0 or step == total:
                        trained += self.clock() - started
                        self._validate(val_loader, logger, progress)
                        started = self.clock()
                    if step >= total or self.stop_reason is not None:
                        break
                    for hook in self.after_step:
                        hook(self)
                    if self.stop_reason is not None:
                        break
                else:
                    self.epoch += 1
                    self.batch_in_epoch = 0
        finally:
            progress.close()
        if self.stop_reason is not None:
            self.save_state()
        else:
            skipped = self.check_bad_steps()
            self.finished = True
            self.save_checkpoint(runs.LAST)
            if main and self.out is not None:
                summary = {"step": self.step_count, "skipped_steps": skipped, "val": self.results}
                atomic_write_text(self.out / runs.METRICS, json.dumps(summary, indent=2))
        self.dist.barrier()
        return self.results

    def _validate(self, val_loader, logger: Logger, progress) -> None:
        self.check_bad_steps()
        evaluation = self.validate(val_loader, keep_first=self.dist.main and logger.writer is not None)
        self.results = evaluation.results
        step = self.step_count
        logger.log(step, "val", self.results)
        if evaluation.first is not None:
            logger.picture(step, "val/slots", self._picture(evaluation.first))
        if self.dist.main:
            progress.write(f"step {step} val " + " ".join(f"{k} {v:.4f}" for k, v in self.results.items()))
        if step >= self.preset.optim.total_steps / 2:
            self.save_checkpoint(runs.checkpoint_name(step))
        self.save_state()


def train(preset: Preset, data: str | Path, out: str | Path, options: RunOptions | None = None, resume: bool = False,
          discovery_ckpt: str | Path | None = None, device: str | torch.device | None = None, *,
          teacher_ckpt: str | Path | None = None, backbone_weights: str | os.PathLike | None = "auto",
          overwrite: bool = False, overrides: list[str] = (), save_every_min: float = 10.0,
          keep_last: int | None = None, clock: Callable[[], float] = time.monotonic, say=print) -> "Trainer | None":
    """Trains `preset` on the LMDB splits in `data` into the run folder `out` (`smoothsa.runs`): refuses a folder
    that holds a run unless `resume` or `overwrite`, saves the state every `save_every_min` minutes (by `clock`)
    and on SIGTERM/SIGINT, keeps the newest `keep_last` checkpoints.

    A new run starts from the task's checkpoints (`discovery_ckpt`, `teacher_ckpt`) or, when it has none, from the
    `backbone_weights` (`smoothsa.pretrained.resolve_backbone_weights`: "auto", "random" or a path); everything the
    user can get wrong (the folder, the weights, the data) is checked before the folder changes. A resumed run
    continues from `out/state.pt` with the saved config.json (`overrides` re-applied to it, see `runs.prepare`).

    Returns the trainer (its `results` are the last validation's), or None when `out` holds a finished run and
    `resume` was asked (nothing to do). Raises `cli.Stopped` (status 143/130) after a signal's save.
    """
    options = options or RunOptions()
    out = Path(out)
    request = dict(overrides=list(overrides), resume=resume, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) != 0:
        say = lambda _: None  # noqa: E731 (the first process speaks for all)
    decision = runs.prepare(out, preset, options, writer=False, say=say, **request)
    if decision.finished:
        return None
    timer, keep = runs.SaveTimer(save_every_min, clock), runs.CheckpointKeeper(out, keep_last)  # checks the flags
    trainer = Trainer(decision.preset, options, device)
    main = trainer.dist.main
    record: dict = {}
    if decision.resumed:
        trainer.load_state_dict(load_training_state(decision.state_path))  # the weights, never reloaded
        say(f"resuming {out} from step {trainer.step_count}")
    else:
        trainer.load_initial_weights(discovery=discovery_ckpt, teacher=teacher_ckpt)
        starts_from = trainer.task.initial_weights
        if starts_from:
            if backbone_weights not in (None, "auto"):
                raise UserError(f"--backbone-weights {backbone_weights}: {preset.name} takes its backbone from the "
                                f"--{starts_from[0]}-ckpt checkpoint; drop --backbone-weights")
            banner = f"backbone weights: from the {starts_from[0]} checkpoint {trainer.initial_weights[starts_from[0]]}"
        else:
            try:
                banner = resolve_backbone_weights(trainer.model, decision.preset, backbone_weights)
            except BackboneWeightsError as error:
                raise UserError(str(error)) from None
        say(f"*** {banner} ***" if banner == RANDOM_BANNER else banner)
        record = {"initial_weights": dict(trainer.initial_weights), "backbone_weights": banner}
    run_preset, optim, dist = decision.preset, decision.preset.optim, trainer.dist

    def loader(split: str, batch_size: int):
        training = split == "train"
        return loader_for(run_preset, data, split, batch_size, training, options.workers, options.backend,
                          optim.seed, dist.rank, dist.world_size, trainer.device,
                          keys=trainer.task.train_keys if training else None)

    try:
        train_loader, val_loader = loader("train", optim.batch_size), loader("val", optim.val_batch_size)
    except ValueError as error:  # the data layer's: an empty split, a reader without the keys the task needs
        raise UserError(str(error)) from None
    # Only the first process writes; the others keep the decision they made before the process group met
    # (checked again now, they would find the folder the first process has just written).
    run = runs.prepare(out, preset, options, record=record, say=say, **request) if main else decision
    trainer.after_checkpoint.append(lambda _, path: keep.prune())
    timer.saved()  # the minutes count from here
    try:
        with runs.StopSignals() as signals:

            def save_when_due(trainer: Trainer) -> None:
                # One process: the flag, every step; several: one all-reduce at logging steps, so all stop together.
                if dist.world_size == 1 or trainer.step_count % options.log_every == 0:
                    if signals.requested_on_any_rank(trainer.device):
                        trainer.stop_reason = signal.Signals(signals.signum).name  # `fit` saves the state
                        return
                if trainer.state_saved_at == trainer.step_count:  # a validation just saved it
                    timer.saved()
                elif timer.due():
                    trainer.save_state()
                    timer.saved()

            trainer.after_step.append(save_when_due)
            trainer.fit(train_loader, val_loader, run.out)
            if trainer.stop_reason is not None:
                raise signals.stopped(trainer.step_count, run.state_path)
    finally:
        dist.close()
    return trainer

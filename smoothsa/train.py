"""Training (docs/official.md §4): Adam, linear-warmup-cosine lr, the detach_flag schedule, gradient clipping, fp16 AMP,
torch.compile, DistributedDataParallel, atomic checkpoints in the official layout, and resume.

    python -m smoothsa.train                       # the embedded demo: synthetic data, CPU, then evaluation
    python -m smoothsa.train --preset smoothsa_r-coco --data data/coco --out runs/coco
    python -m smoothsa.train --preset smoothsav_c-movi_c --data data/movi_c --out runs/movi_c --set optim.batch_size=4
    python -m smoothsa.train --preset smoothsa_r-coco --data data/coco --out runs/coco --resume
    torchrun --nproc_per_node 8 -m smoothsa.train --preset smoothsa_r-coco --data data/coco --out runs/coco
    python -m smoothsa.train --preset smoothsa_r_recogn-coco --data data/coco --out runs/recogn \\
        --discovery-ckpt runs/coco/ckpt-0100000.pth

`--set section.field=value` overrides any preset field (see `smoothsa.presets`); the batch size is per GPU.
"""
import argparse
import contextlib
import csv
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from smoothsa import schedules
from smoothsa.build import build_model
from smoothsa.checkpoint import load_official
from smoothsa.data import LoaderOptions, build_loader
from smoothsa.metrics import MetricAverager
from smoothsa.presets import Preset, apply_overrides, get_preset, preset_to_dict
from smoothsa.state import load_training_state, save_checkpoint, save_training_state, set_rng_state
from smoothsa.steps import discovery_metrics, forward_losses, recognition_scores


@dataclass
class RunOptions:
    """How to run (not what to train: that is the preset).

    amp: "fp16" (with a GradScaler), "bf16" or "none"; "auto" = fp16 on CUDA, none on CPU.
    compile: torch.compile the model; None = on for CUDA, off for CPU.
    backend: data loader, "torch" or "dali".
    workers: loader workers (DALI: threads) per process.
    max_bad_steps: consecutive non-finite losses tolerated before stopping.
    log_every: steps between logged lines (each costs a host sync).
    """

    amp: str = "auto"
    compile: bool | None = None
    backend: str = "torch"
    workers: int = 4
    max_bad_steps: int = 20
    log_every: int = 20
    official_compat: bool = False


class Distributed:
    """torchrun's environment: rank, world size, this process's device."""

    def __init__(self, device: str | None = None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

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


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def clip_gradients(parameters, optim) -> torch.Tensor | None:
    if optim.clip_norm is None:
        return None
    norm_type = math.inf if optim.clip_type == "inf" else 2.0
    return torch.nn.utils.clip_grad_norm_(parameters, optim.clip_norm, norm_type=norm_type)


class Logger:
    """CSV always; TensorBoard event files when the `tensorboard` package is installed. Rank 0 only."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.path = out / "log.csv"
        self.writer = None
        self.fields: list[str] | None = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass

    def log(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split} | {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in values.items()}
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "split", "name", "value"])
            for name, value in values.items():
                writer.writerow([step, split, name, row[name]])
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{split}/{name}", value, step)
            self.writer.flush()


def set_detach_flag(model: torch.nn.Module, value: bool) -> None:
    for module in model.modules():
        if hasattr(module, "detach_flag") and torch.is_tensor(module.detach_flag):
            module.detach_flag.fill_(value)


@torch.no_grad()
def validate(model, loader, preset: Preset, device, amp: str, official_compat: bool, seed: int, dist_: Distributed) -> dict:
    """Losses and metrics over the whole validation split (this process's shard, then all-reduced)."""
    model.eval()
    averager = MetricAverager()
    generator = torch.Generator(device=device).manual_seed(seed)
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, amp):
            with _fixed_noise(generator):
                out, terms = forward_losses(model, batch, preset)
        values = {}
        if terms is not None:
            values |= {f"loss_{k}": v.detach().float().reshape(1) for k, v in terms.items()}
        if preset.model.arch == "recognition":
            values |= recognition_scores(out)
        else:
            values |= discovery_metrics(out, batch["segment"], official_compat)
        averager.update(values)
    model.train()
    result = averager.compute()
    if dist_.world_size > 1:
        result = _all_reduce_mean(result, device)
    return result


@contextlib.contextmanager
def _fixed_noise(generator: torch.Generator):
    """Validation draws the initializer's eval-mode noise from a seeded generator: reproducible numbers."""
    state = torch.get_rng_state() if generator.device.type == "cpu" else torch.cuda.get_rng_state(generator.device)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    torch.manual_seed(seed)
    try:
        yield
    finally:
        if generator.device.type == "cpu":
            torch.set_rng_state(state)
        else:
            torch.cuda.set_rng_state(state, generator.device)


def _all_reduce_mean(result: dict, device) -> dict:
    keys = sorted(result)
    values = torch.tensor([float(result[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return {k: (int(round(v * dist.get_world_size())) if k == "num" else v) for k, v in zip(keys, values.tolist())}


def train(preset: Preset, data: str | Path, out: str | Path, options: RunOptions = RunOptions(), resume: bool = False,
          discovery_ckpt: str | None = None, device: str | None = None) -> dict:
    """Trains `preset` on the LMDB splits in `data`, writing into `out`; returns the last validation results."""
    dist_ = Distributed(device)
    device = dist_.device
    out = Path(out)
    optim = preset.optim
    total = optim.total_steps
    amp = options.amp if options.amp != "auto" else ("fp16" if device.type == "cuda" else "none")
    use_compile = options.compile if options.compile is not None else device.type == "cuda"
    if amp not in ("fp16", "bf16", "none"):
        raise ValueError(f"amp must be fp16, bf16, none or auto, got {options.amp!r}")
    if not 0.0 <= optim.preheat_detach <= 1.0:
        raise ValueError(f"optim.preheat_detach must lie in [0, 1], got {optim.preheat_detach}")
    seed_everything(optim.seed + dist_.rank)

    model = build_model(preset.model, backbone=True)
    if preset.model.arch == "recognition" and not resume:
        if discovery_ckpt is None:
            raise ValueError(f"{preset.name} trains a probe on a frozen discovery model: pass --discovery-ckpt")
        load_official(model.discov, discovery_ckpt)
    model.to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=optim.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    step = epoch = batch_in_epoch = 0
    bad_total = 0
    state_path = out / "state.pt"
    if resume:
        state = load_training_state(state_path)
        load_official(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        bad_total = state["extra"].get("bad_steps", 0)
        set_rng_state(state["rng"])
    if dist_.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(preset_to_dict(preset), indent=2))

    loading = LoaderOptions(batch_size=optim.batch_size, workers=options.workers, backend=options.backend,
                            seed=optim.seed, rank=dist_.rank, world_size=dist_.world_size,
                            device_id=device.index if device.type == "cuda" else None)
    train_loader = build_loader(preset, data, "train", loading)
    val_loader = build_loader(preset, data, "val", replace(loading, batch_size=optim.val_batch_size))
    if len(train_loader) == 0:
        raise ValueError(f"the training split of {data} has fewer samples than one batch ({optim.batch_size})")
    train_loader.set_epoch(epoch, skip_batches=batch_in_epoch)

    net = model
    if dist_.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if use_compile:
        net = torch.compile(net)
    if dist_.main:
        fused = getattr(model, "discov", model).aggregat.fused
        print(f"{preset.name}: {total} steps, batch {optim.batch_size} per process × {dist_.world_size} = "
              f"{optim.batch_size * dist_.world_size} global, device {device}, amp {amp}, compile {use_compile}, "
              f"fused kernels {fused}", flush=True)

    stop = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    logger = Logger(out, dist_.main)
    val_interval = max(1, total // optim.validations)
    results: dict = {}
    bad_in_row = 0
    progress = tqdm(total=total, initial=step, disable=not dist_.main, dynamic_ncols=True, desc=preset.name)
    timer, images = time.perf_counter(), 0

    def save_state():
        if dist_.main:
            save_training_state(state_path, model, optimizer, scaler, step, epoch, batch_in_epoch, {"bad_steps": bad_total})

    net.train()
    try:
        while step < total and stop["signal"] is None:
            for batch in train_loader:
                batch_in_epoch += 1
                lr = schedules.linear_warmup_cosine(step, total, optim.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if "preheat" in optim.loss_weights:
                    set_detach_flag(model, schedules.detach_flag(step, total, optim.preheat_detach))
                batch = to_device(batch, device)
                with autocast(device, amp):
                    _, terms = forward_losses(net, batch, preset)
                if terms is None:  # recognition: no slot matched an object in this batch
                    bad_in_row = 0
                    continue
                loss = sum(terms.values())
                # Sync point: one scalar per step, to skip non-finite losses before they reach the weights.
                if not torch.isfinite(loss).item():
                    bad_in_row += 1
                    bad_total += 1
                    optimizer.zero_grad(set_to_none=True)
                    if bad_in_row > options.max_bad_steps:
                        raise FloatingPointError(
                            f"{bad_in_row} consecutive steps had a non-finite loss (last at step {step}: "
                            f"{ {k: float(v.detach()) for k, v in terms.items()} }); stopping. Lower optim.lr or use --amp bf16/none."
                        )
                    continue
                bad_in_row = 0
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                clip_gradients(parameters, optim)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                images += batch[("video" if "video" in batch else "image")].shape[0] * dist_.world_size
                progress.update(1)
                if step % options.log_every == 0 or step == total:
                    elapsed = time.perf_counter() - timer
                    # Sync point: reading the losses, once every log_every steps.
                    values = {k: float(v.detach()) for k, v in terms.items()}
                    values |= {"loss": float(loss.detach()), "lr": lr, "images_per_s": images / max(elapsed, 1e-9)}
                    progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{values['images_per_s']:.1f}")
                    logger.log(step, "train", values | {"skipped_steps": bad_total})
                    timer, images = time.perf_counter(), 0
                if step % val_interval == 0 or step == total:
                    results = validate(net, val_loader, preset, device, amp, options.official_compat, optim.seed, dist_)
                    logger.log(step, "val", results)
                    if dist_.main:
                        progress.write(f"step {step} val " + " ".join(f"{k} {v:.4f}" for k, v in results.items()))
                        if step >= total / 2:
                            save_checkpoint(model, out / f"ckpt-{step:07d}.pth")
                    save_state()
                if step >= total or stop["signal"] is not None:
                    break
            else:
                epoch += 1
                batch_in_epoch = 0
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        progress.close()
    if stop["signal"] is not None:
        save_state()
        if dist_.main:
            print(f"stopped by signal {stop['signal']} at step {step}; continue with --resume", flush=True)
    elif dist_.main:
        save_checkpoint(model, out / "last.pth")
        (out / "metrics.json").write_text(json.dumps({"step": step, "skipped_steps": bad_total, "val": results}, indent=2))
    dist_.barrier()
    dist_.close()
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="preset name (default: the embedded demo)")
    parser.add_argument("--data", help="folder with train.lmdb and val.lmdb")
    parser.add_argument("--out", help="run folder (checkpoints, logs, config); default runs/<preset>")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset field, e.g. optim.lr=1e-4 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its state.pt")
    parser.add_argument("--discovery-ckpt", help="recognition presets: the trained discovery checkpoint")
    parser.add_argument("--device", help="e.g. cpu, cuda:0 (default: this process's GPU, else CPU)")
    parser.add_argument("--amp", default="auto", choices=["auto", "fp16", "bf16", "none"])
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None)
    parser.add_argument("--compile", dest="compile", action="store_true")
    parser.add_argument("--loader", default="torch", choices=["torch", "dali"])
    parser.add_argument("--workers", type=int, help="loader workers per process (default 4; the demo: 0)")
    parser.add_argument("--official-compat", action="store_true", help="validation metrics as the official code")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.preset is None:
        from smoothsa.demo import run_demo

        run_demo(args)
        return
    if args.data is None:
        sys.exit("--data is required with --preset (a folder with train.lmdb and val.lmdb)")
    try:
        preset = apply_overrides(get_preset(args.preset), args.overrides)
    except (KeyError, ValueError) as error:
        sys.exit(f"error: {error}")
    workers = 4 if args.workers is None else args.workers
    options = RunOptions(args.amp, args.compile, args.loader, workers, official_compat=args.official_compat)
    out = args.out or f"runs/{preset.name}"
    train(preset, args.data, out, options, resume=args.resume, discovery_ckpt=args.discovery_ckpt, device=args.device)


if __name__ == "__main__":
    main()

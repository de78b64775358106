"""The run folder (`--out`): runs that never lose or overwrite work.

* A new run in a folder that already holds one (state.pt, last.pth, ckpt-*.pth, metrics.json, config.json,
  log.csv) is refused unless `--resume` (continue it) or `--overwrite` (its files are moved aside into
  `<out>/previous-<n>/`, and the run says so).
* `--resume` continues with the run's saved `config.json`: `--set` overrides are applied on top of the saved
  preset, and any that changes it is refused, naming the fields, except those in `RESUME_CHANGEABLE`. A
  finished run (metrics.json at the last step) is left untouched: "nothing to do", exit status 0.
* `.tmp` files of an interrupted atomic write are removed at start; `log.csv` loses the rows written after the
  state it resumes from (no duplicate or future rows).
* The state is saved every `--save-every-min` minutes (`SaveTimer`) and on SIGTERM/SIGINT at the next step
  boundary (`StopSignals`), after which the run exits with 128 + the signal number (143, 130) and says how to
  continue; a second Ctrl-C stops at once (the state is the last one saved). Loader workers ignore both
  signals (their `worker_init_fn`, `dataio.epochs.seed_worker`): the main process stops them. `--keep-last N` keeps the newest N
  `ckpt-*.pth` (default: all, as the official code).

`smoothsa.trainer.train` is this sequence on a `Trainer` (its `after_step` and `after_checkpoint` hooks):

    run = runs.prepare(out, preset, options, overrides=..., resume=..., overwrite=..., writer=False)  # every rank
    if run.finished: return                        # a finished run asked to resume: nothing to do
    timer, keep = runs.SaveTimer(save_every_min), runs.CheckpointKeeper(out, keep_last)
    trainer = Trainer(run.preset, options, device); a resume loads `run.state_path`, a new run its weights
    if rank == 0: runs.prepare(..., writer=True, record=...)   # the folder changes only after every check
    with runs.StopSignals() as signals:
        trainer.fit(...)    # the state saved on a signal or when `timer.due()`; keep.prune() per checkpoint
        if trainer.stop_reason: raise signals.stopped(trainer.step_count, run.state_path)

The loop logs a step before it saves the state of that step, so the rows of log.csv a resume keeps are those of
the saved state. Under torchrun every rank must stop at the same step: test
`signals.requested_on_any_rank(device)` (one all-reduce) instead of `signals.requested`, e.g. at logging
steps. TensorBoard: `SummaryWriter(..., purge_step=run.step + 1)` drops its events after the resumed step as
`prepare` does for log.csv.
"""
import argparse
import csv
import dataclasses
import io
import json
import math
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from smoothsa.cli import Stopped, UserError
from smoothsa.presets import Preset, apply_overrides, preset_from_dict, preset_to_dict
from smoothsa.state import TMP_SUFFIX, atomic_write_text

CONFIG, STATE, METRICS, LOG, LAST = "config.json", "state.pt", "metrics.json", "log.csv", "last.pth"
RUN_FILES = (STATE, LAST, METRICS, CONFIG, LOG)
CHECKPOINT = re.compile(r"^ckpt-(\d+)\.pth$")
# Written by a run too, and moved aside with it by --overwrite, but not what makes a folder "hold a run".
RUN_FOLDERS = ("tensorboard", "eval")
# Fields of config.json a resumed run may change: they change neither the weights nor the data order.
RESUME_CHANGEABLE = (
    "optim.validations",      # how often to validate and checkpoint
    "optim.val_batch_size",   # validation memory; per-sample metrics do not depend on it
    "options.workers",        # loader processes; each sample's augmentation is seeded by its index
    "options.log_every",
    "options.compile",
    "options.compile_mode",
    "options.compile_backend",
    "options.max_bad_steps",
)


@dataclass
class Run:
    """A prepared run folder. `preset` and `options` are what to train with (for a resumed run, the saved ones
    with the allowed overrides); `resumed`: continue from `state_path`, saved at `step`; `finished`: a finished
    run was asked to resume, there is nothing to do."""

    out: Path
    preset: Preset
    options: dict
    resumed: bool = False
    finished: bool = False
    step: int = 0

    @property
    def state_path(self) -> Path:
        return self.out / STATE


def holds_run(out: Path) -> list[str]:
    """The names of the run files in `out` (empty: no run there)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name in RUN_FILES or CHECKPOINT.match(p.name))


def run_config(preset: Preset, options: dict) -> dict:
    """What config.json holds: the resolved preset and, under "options", how it is run."""
    return preset_to_dict(preset) | {"options": options}


def prepare(out: str | Path, preset: Preset, options, *, overrides: list[str] = (), resume: bool = False,
            overwrite: bool = False, writer: bool = True, record: dict | None = None, say=print) -> Run:
    """Checks `out` against the request and gets it ready; see the module docstring.

    Args:
        preset: the preset built from the command line (used as is for a new run; on resume only its name is
            compared, and `overrides` are re-applied to the saved preset).
        options: how the run is run (a dataclass or a JSON-ready dict), saved in config.json under "options".
        writer: this process may change files (rank 0); the others only check, and see the same decision.
            A writer may call `prepare` again with `writer=False` first, to check before it builds the model.
        record: more of a new run's config.json (e.g. its initial weights); a resume keeps the saved entries.
        say: where the notes go (moved files, removed leftovers, dropped log rows).
    Raises:
        UserError: the folder holds a run and neither `resume` nor `overwrite` was asked; nothing to resume;
            a resume that changes the saved configuration; an unreadable config.json or state.pt.
    """
    out = Path(out)
    options = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: continue the run, or start it again")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder for the run")
    present = holds_run(out)
    if resume:
        return _resume(out, preset, options, list(overrides), writer, say)
    if present and not overwrite:
        raise UserError(f"{out} already holds a run ({', '.join(present[:4])}{', …' if len(present) > 4 else ''}); "
                        "continue it with --resume, start it again with --overwrite (the old files are moved to "
                        f"{out}/previous-<n>/), or choose another --out")
    if writer:
        _remove_leftovers(out, say)
        if present:
            _move_aside(out, say)
        atomic_write_text(out / CONFIG, json.dumps(run_config(preset, options) | dict(record or {}), indent=2))
    return Run(out, preset, options)


def _resume(out: Path, preset: Preset, options: dict, overrides: list[str], writer: bool, say) -> Run:
    if not (out / CONFIG).is_file():
        raise UserError(f"nothing to resume in {out}: it has no {CONFIG}; drop --resume to start a new run there")
    saved = _read_json(out / CONFIG)
    saved_preset = preset_from_dict(saved)
    if saved_preset.name != preset.name:
        raise UserError(f"the run in {out} trains preset {saved_preset.name!r}, not {preset.name!r}; "
                        f"resume it with --preset {saved_preset.name}")
    resumed = apply_overrides(saved_preset, overrides)
    saved_options = saved.get("options", options)
    changed = _differences(run_config(saved_preset, saved_options), run_config(resumed, options))
    refused = [c for c in changed if c[0] not in RESUME_CHANGEABLE]
    if refused:
        listed = "; ".join(f"{key}: saved {old!r}, now {new!r}" for key, old, new in refused)
        raise UserError(f"--resume continues the run in {out} with its saved {CONFIG}, and this would change it "
                        f"({listed}); drop these --set/flags, or start a new run with another --out or --overwrite "
                        f"(resumable changes: {', '.join(RESUME_CHANGEABLE)})")
    if (out / METRICS).is_file():
        done = _read_json(out / METRICS).get("step", 0)
        if done >= resumed.optim.total_steps:
            say(f"the run in {out} finished at step {done} ({out / METRICS}); nothing to do")
            return Run(out, resumed, options, resumed=True, finished=True, step=done)
    if not (out / STATE).is_file():
        raise UserError(f"{out} has no {STATE} to resume from (the run stopped before its first save); "
                        "start it again with --overwrite")
    step = _saved_step(out / STATE)
    if writer:
        _remove_leftovers(out, say)
        _truncate_log(out / LOG, step, say)
        if changed:
            say("resuming with " + ", ".join(f"{key} {old!r} → {new!r}" for key, old, new in changed))
            atomic_write_text(out / CONFIG, json.dumps(saved | run_config(resumed, options), indent=2))
    return Run(out, resumed, options, resumed=True, step=step)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is unreadable ({error}); repair or remove it, or start again with --overwrite") from None


def _saved_step(path: Path) -> int:
    """The step of a training state, read without loading its tensors into memory."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception as error:  # a truncated or foreign file: torch raises several kinds
        raise UserError(f"{path} is not a readable training state ({type(error).__name__}: {error}); "
                        "start the run again with --overwrite") from None


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "loss_weights":
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def _differences(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, new value) of every field that differs."""
    saved, now = _flatten(saved), _flatten(now)
    keys = sorted(saved.keys() | now.keys())
    return [(key, saved.get(key), now.get(key)) for key in keys if saved.get(key) != now.get(key)]


def _remove_leftovers(out: Path, say) -> None:
    """`.tmp` files of an atomic write that was interrupted (the file it was replacing is intact)."""
    if not out.is_dir():
        return
    for folder in [out] + [out / name for name in RUN_FOLDERS if (out / name).is_dir()]:
        for tmp in sorted(folder.glob(f"*{TMP_SUFFIX}")):
            if tmp.is_file():
                tmp.unlink()
                say(f"removed {tmp}, left by an interrupted write")


def _move_aside(out: Path, say) -> Path:
    taken = [int(m.group(1)) for p in out.iterdir() if (m := re.fullmatch(r"previous-(\d+)", p.name))]
    destination = out / f"previous-{max(taken, default=0) + 1}"
    destination.mkdir()
    moved = [p for p in sorted(out.iterdir()) if p.name in RUN_FILES + RUN_FOLDERS or CHECKPOINT.match(p.name)]
    for path in moved:
        path.rename(destination / path.name)
    say(f"--overwrite: moved the previous run ({len(moved)} files and folders) to {destination}/; "
        "delete it to free the space")
    return destination


def _truncate_log(path: Path, step: int, say) -> None:
    """Drops the rows of log.csv after `step` (written after the state the run resumes from) and a last row cut
    short by a kill, so that the resumed run appends to a clean file."""
    if not path.is_file():
        return
    with open(path, newline="") as file:
        text = file.read()
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    kept = [row for row in body if len(row) == len(header) and row[0].isdigit() and int(row[0]) <= step]
    if len(kept) == len(body) and text.endswith("\n"):
        return
    clean = io.StringIO(newline="")
    csv.writer(clean).writerows([header] + kept)  # the line ends the training logger's csv.writer appends with
    atomic_write_text(path, clean.getvalue())
    if len(kept) < len(body):
        say(f"dropped {len(body) - len(kept)} rows of {path} logged after step {step}, the step it resumes from")


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint written at `step` (`CHECKPOINT` reads the step back)."""
    return f"ckpt-{step:07d}.pth"


class CheckpointKeeper:
    """`ckpt-<step>.pth` names, and `--keep-last N`: after each new checkpoint, `prune()` deletes all but the
    newest N (None: keep every one, as the official code does). `last.pth` is never deleted."""

    def __init__(self, out: str | Path, keep_last: int | None = None):
        if keep_last is not None and keep_last < 1:
            raise UserError(f"--keep-last must be at least 1, got {keep_last}")
        self.out = Path(out)
        self.keep_last = keep_last

    def path(self, step: int) -> Path:
        return self.out / checkpoint_name(step)

    def checkpoints(self) -> list[Path]:
        """The checkpoints in the folder, oldest first."""
        found = [(int(m.group(1)), p) for p in self.out.glob("ckpt-*.pth") if (m := CHECKPOINT.match(p.name))]
        return [p for _, p in sorted(found)]

    def prune(self) -> list[Path]:
        """Deletes the checkpoints beyond the newest `keep_last`; returns them."""
        if self.keep_last is None:
            return []
        old = self.checkpoints()[: -self.keep_last]
        for path in old:
            path.unlink()
        return old


class SaveTimer:
    """Says when the training state is due: `every_min` minutes after the last save (0: never by time).

    `clock` returns seconds (default `time.monotonic`); tests pass their own."""

    def __init__(self, every_min: float = 10.0, clock=time.monotonic):
        if not (math.isfinite(every_min) and every_min >= 0):
            raise UserError(f"--save-every-min must be a number of minutes ≥ 0 (0: only at validations), got {every_min}")
        self.every_s = every_min * 60.0
        self.clock = clock
        self.last = clock()

    def due(self) -> bool:
        return self.every_s > 0 and self.clock() - self.last >= self.every_s

    def saved(self) -> None:
        self.last = self.clock()


class StopSignals:
    """SIGTERM and SIGINT ask the run to stop at the next step boundary, after saving its state; a second SIGINT
    stops at once (raises `cli.Stopped`, status 130; the state is the last one saved). A context manager: the
    previous handlers come back on exit. Only the main thread can install signal handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, hint: str = "run the same command with --resume to continue"):
        self.hint = hint
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        self._previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def handle(self, signum: int, frame=None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise Stopped(f"stopped at once by a second Ctrl-C; the state is the last one saved: {self.hint}",
                          128 + signum)
        self.signum = signum
        # os.write, not print: a handler may interrupt a print of the main thread.
        os.write(2, f"\n{signal.Signals(signum).name}: saving the state at the end of this step, then stopping"
                    f"{' (Ctrl-C again: stop at once)' if signum == signal.SIGINT else ''}\n".encode())

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def requested_on_any_rank(self, device: torch.device) -> bool:
        """Whether any process of the group got a signal: every rank must stop at the same step (one all-reduce,
        a host sync: call it every few steps, e.g. at logging steps)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        requested = bool(flag.item())  # the host sync
        if requested and self.signum is None:
            self.signum = signal.SIGTERM
        return requested

    def stopped(self, step: int, state_path: str | Path) -> Stopped:
        """The exception to raise once the state of `step` is saved: `cli.entry_point` prints it and exits 128 + signal."""
        name = signal.Signals(self.signum).name
        return Stopped(f"stopped by {name} at step {step}; the state is saved in {state_path}: {self.hint}",
                       128 + self.signum)


def add_arguments(parser) -> None:
    """The run-folder flags besides --resume: --overwrite, --save-every-min, --keep-last."""
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in an --out that holds a run (its files are moved to <out>/previous-<n>/)")
    parser.add_argument("--save-every-min", type=_minutes, default=10.0, metavar="MIN",
                        help="also save the training state every MIN minutes (default 10; 0: only at validations)")
    parser.add_argument("--keep-last", type=_positive, default=None, metavar="N",
                        help="keep only the newest N ckpt-*.pth (default: all)")


def _minutes(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected minutes ≥ 0, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text}")
    return value


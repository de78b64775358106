"""Files a run writes: checkpoints in the official layout and a resumable training state, both atomic.

A file is written to `<name>.tmp` in the same folder, flushed to disk, then renamed over `<name>`: a run
killed at any moment leaves either the old file or the new one, never a truncated one. A write that fails
(a full disk, a read-only folder) removes its `.tmp`, leaves the previous file as it was and raises a
`UserError` naming the file and the cause ("No space left on device").
"""
import errno
import os
import random
from pathlib import Path

import numpy as np
import torch

from smoothsa.checkpoint import official_state_dict
from smoothsa.cli import WRITE_ERRNOS, UserError, fix_for

TMP_SUFFIX = ".tmp"


class _FileSink:
    """What `torch.save` writes into: every byte reaches the file or the write raises. (Handed a Python file that
    accepted fewer bytes than asked, as a nearly full disk does, torch's zip writer reports only `unexpected pos
    …`; here the short write becomes the OSError behind it.)"""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            written = os.write(self.fd, view)
            if written == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]
        return total

    def flush(self) -> None:
        pass


def atomic_write(path: str | Path, write) -> Path:
    """Calls `write(file)` on `<path>.tmp`, fsyncs it and renames it over `path`; see the module docstring."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write(_FileSink(fd))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        cause = _os_error(error)
        if cause is None:
            raise
        kept = " (the previous one is kept)" if path.exists() else ""
        raise UserError(f"cannot write {path}{kept}: {os.strerror(cause.errno)}; {fix_for(cause.errno)}") from error
    return path


def _os_error(error: BaseException) -> OSError | None:
    """The full-disk or read-only error behind `error` (torch's writer wraps it in a RuntimeError), else None."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def atomic_save(obj, path: str | Path) -> Path:
    """`torch.save(obj)` into `path`, atomically."""
    return atomic_write(path, lambda file: torch.save(obj, file))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """A text file (config.json, metrics.json, log.csv), atomically."""
    return atomic_write(path, lambda file: file.write(text.encode()))


def save_checkpoint(model: torch.nn.Module, path: str | Path) -> Path:
    """The model in the official key layout (`m.…`), readable by the official eval.py and by ours."""
    return atomic_save({k: v.detach().cpu() for k, v in official_state_dict(model).items()}, path)


def rng_state() -> dict:
    """All RNG states as tensors and plain Python values, so the file loads with `weights_only=True`."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_state(path: str | Path) -> dict:
    """A state written by `smoothsa.trainer.Trainer.save_state` (see `Trainer.state_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training state to resume from at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)

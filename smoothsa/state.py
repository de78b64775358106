"""Files a run writes: checkpoints in the official layout and a resumable training state, both atomic.

A file is written to `<name>.tmp` in the same folder, flushed to disk, then renamed over `<name>`: a run
killed at any moment leaves either the old file or the new one, never a truncated one.
"""
import os
import random
from pathlib import Path

import numpy as np
import torch

from smoothsa.checkpoint import official_state_dict


def atomic_save(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Writes a small text file atomically (tmp + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


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

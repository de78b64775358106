"""Official checkpoint layout: `ModelWrap(m).state_dict()`, every key prefixed with `m.` (docs/official.md §2.13).

Our module names are the official ones, so converting is adding or removing that prefix. Loading checks the
key set and every shape before touching the model, and names what does not match.
"""
import os
import re

import torch
import torch.nn as nn

from smoothsa.cli import UserError

PREFIX = "m."
BACKBONE_KEY = re.compile(r"(^|\.)encode_backbone\.")  # matches the keys of the DINOv2 backbone


class BadCheckpoint(UserError):
    """A checkpoint file that cannot be read, or whose keys or shapes do not fit the model."""


class CheckpointMismatch(BadCheckpoint, KeyError):
    """The keys or shapes of a checkpoint do not fit the model (a `KeyError` too, for code that expects one)."""


class NotAStateDict(BadCheckpoint, TypeError):
    """A file that loads, but not to a dict of named tensors (a `TypeError` too, for code that expects one)."""


def _load_failure(error: BaseException) -> str:
    """One line of `torch.load`'s error: the unpickler's reason, or the first sentence."""
    text = str(error)
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:  # objects other than tensors, refused by weights_only=True
            return "weights_only refused it: " + line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
    first = text.strip().split(". ")[0] if text.strip() else ""
    return f"{type(error).__name__}: {first}"


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with the official `m.` prefix, in the official key order."""
    return {PREFIX + key: value for key, value in model.state_dict().items()}


def read_checkpoint(state_dict_or_path) -> dict[str, torch.Tensor]:
    """A path (loaded with `weights_only=True`) or a state_dict → a flat state_dict."""
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        path = os.fspath(state_dict_or_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}; pass the path of a .pth file "
                                    "(e.g. runs/<name>/last.pth)")
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated, not a torch file, or pickled objects weights_only refuses
            raise BadCheckpoint(f"{path} is not a readable checkpoint ({_load_failure(error)}); "
                                "re-download or re-write it") from error
    else:
        state_dict = state_dict_or_path
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise NotAStateDict(f"checkpoint is not a state_dict (a dict of named tensors): {type(state_dict).__name__}")
    if "model" in state_dict and isinstance(state_dict["model"], dict):  # a resumable training state
        state_dict = state_dict["model"]
    return state_dict


def load_official(model: nn.Module, state_dict_or_path, strict: bool = True) -> nn.Module:
    """Loads an official checkpoint (keys `m.…`, or already without the prefix) into a model built by
    `build_model`. Backbone keys are dropped when the model was built with `backbone=False`.

    With `strict`, a missing, unexpected or wrongly shaped key is an error that names it; without, matching
    keys are loaded and the rest reported in the returned model's `load_report` attribute.
    """
    state_dict = read_checkpoint(state_dict_or_path)
    if any(k.startswith(PREFIX) for k in state_dict):
        outside = [k for k in state_dict if not k.startswith(PREFIX)]
        if outside:
            raise CheckpointMismatch(f"load_official: checkpoint mixes `m.` keys with others, e.g. {outside[:5]}")
        state_dict = {k[len(PREFIX) :]: v for k, v in state_dict.items()}
    expected = model.state_dict()
    if not any(BACKBONE_KEY.search(k) for k in expected):
        state_dict = {k: v for k, v in state_dict.items() if not BACKBONE_KEY.search(k)}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{PREFIX}{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:10])}")
    if problems and strict:
        raise CheckpointMismatch(f"load_official: checkpoint does not match {type(model).__name__}: " + " | ".join(problems)
                                 + "; is it the checkpoint of this preset?")
    loadable = {k: v for k, v in state_dict.items() if k in expected and tuple(v.shape) == tuple(expected[k].shape)}
    model.load_state_dict(loadable, strict=False)
    model.load_report = problems
    return model


def _names(keys: list[str], most: int = 10) -> str:
    shown = ", ".join(PREFIX + k for k in keys[:most])
    return shown + (f", … ({len(keys) - most} more)" if len(keys) > most else "")

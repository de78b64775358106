"""The pretrained DINOv2 ViT-S/14 with 4 registers, loaded into the backbone (docs/official.md §2.1).

The official code builds its backbone with `timm.create_model("vit_small_patch14_reg4_dinov2.lvd142m",
pretrained=True, img_size=224)`; `load_dinov2` gives the same tensors without timm:

    model = smoothsa.build_model("smoothsa_r-coco")
    smoothsa.load_dinov2(model)                      # the cached file, else the download (hash checked)
    smoothsa.load_dinov2(model, "dinov2_vits14_reg4_pretrain.pth")  # or timm's model.safetensors, or a checkpoint

Accepted files:
* facebookresearch's `dinov2_vits14_reg4_pretrain.pth` (torch.hub `facebookresearch/dinov2`, `dinov2_vits14_reg`):
  `cls_token`, `register_tokens`, `mask_token`, `pos_embed` (1, 1 + 37·37, 384), `patch_embed.proj.*`,
  `blocks.*`, `norm.*`;
* timm's `timm/vit_small_patch14_reg4_dinov2.lvd142m` (`model.safetensors` or `pytorch_model.bin`): `reg_token`,
  `pos_embed` (1, 37·37, 384), no `mask_token`;
* a SmoothSA checkpoint, official or ours: its `m.encode_backbone.1.*` keys.

The conversion is timm's: the class token absorbs the first position (`cls_token + pos_embed[:, 0]`),
`register_tokens` becomes `reg_token`, the 37×37 position table is resampled to the model's grid (bicubic,
antialiased, in float32), and `mask_token` and the final `norm.*` are dropped (the backbone has no final norm).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import urllib.error
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from smoothsa.backbone import DINOv2ViT
from smoothsa.checkpoint import read_checkpoint

DINOV2_FILE = "dinov2_vits14_reg4_pretrain.pth"
DINOV2_URL = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/{DINOV2_FILE}"
DINOV2_SHA256 = "f433177089a681826f849f194ece3bb48f4d63fb38d32fc837e3dc7a4e5641fb"
TIMM_REPO = "timm/vit_small_patch14_reg4_dinov2.lvd142m"
TIMM_FILES = ("model.safetensors", "pytorch_model.bin")
RANDOM_BANNER = "RANDOM BACKBONE: no pretrained DINOv2 weights loaded (--backbone-weights random); features are noise"

_CHECKPOINT_BACKBONE = re.compile(r"^(?:m\.)?(?:discov\.)?encode_backbone\.1\.")


class BackboneWeightsError(RuntimeError):
    """The backbone weights cannot be used: a file does not match the backbone (the message names the key and
    the file), or the choice does not fit the preset."""


class WeightsUnavailableError(BackboneWeightsError):
    """No cached weights and the download failed (offline): the message names the URL, the cache folder and
    `--backbone-weights`."""


# ------------------------------------------------------------------------------------------------
# reading files


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file: an 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw little-endian data."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise BackboneWeightsError(f"{path}: too short for a .safetensors file")
    length = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError as error:
        raise BackboneWeightsError(f"{path}: not a .safetensors file (unreadable header: {error})") from None
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + length :]
    tensors = {}
    for name, entry in header.items():
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise BackboneWeightsError(f"{path}: tensor {name!r} has an unsupported dtype {entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end <= len(body):
            raise BackboneWeightsError(f"{path}: tensor {name!r} lies outside the file (truncated?)")
        flat = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        count = math.prod(entry["shape"])
        if flat.numel() != count:
            raise BackboneWeightsError(
                f"{path}: tensor {name!r} holds {flat.numel()} values, its shape {entry['shape']} needs {count}"
            )
        tensors[name] = flat.reshape(entry["shape"])
    return tensors


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A `.safetensors` file or a torch file (loaded with `weights_only=True`) → a flat state_dict."""
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        return read_checkpoint(path)
    except Exception as error:  # an unpickling error, a non-dict, a truncated zip: all say "not weights"
        raise BackboneWeightsError(f"{path}: not a readable weights file ({type(error).__name__}: {error})") from None


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# conversion


def resample_position_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """timm's `resample_abs_pos_embed` without prefix tokens: a square (1, g·g, D) table → (1, grid·grid, D),
    bicubic with antialiasing (align_corners False), computed in float32 and cast back."""
    old = math.isqrt(table.shape[1])
    if old * old != table.shape[1]:
        raise ValueError(f"position table of {table.shape[1]} entries is not a square grid")
    if old == grid:
        return table
    dim = table.shape[-1]
    image = table.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(table.dtype)


def backbone_state_dict(weights: dict[str, torch.Tensor], grid: int, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """Any accepted layout → the `DINOv2ViT` state_dict for a `grid`×`grid` token grid, and the layout's name."""
    if any(_CHECKPOINT_BACKBONE.match(k) for k in weights):
        state = {_CHECKPOINT_BACKBONE.sub("", k): v for k, v in weights.items() if _CHECKPOINT_BACKBONE.match(k)}
        layout = "SmoothSA checkpoint"
    elif "register_tokens" in weights:
        state = dict(weights)
        state.pop("mask_token", None)
        for key in ("cls_token", "pos_embed"):
            if key not in state:
                raise BackboneWeightsError(f"{source}: the facebookresearch layout lacks the key {key!r}")
        table = state.pop("pos_embed")
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = state["cls_token"] + table[:, 0]
        state["pos_embed"] = table[:, 1:]
        layout = "facebookresearch DINOv2"
    else:
        state = dict(weights)
        state.pop("mask_token", None)
        layout = "timm"
    for key in [k for k in state if k.startswith("norm.")]:
        del state[key]
    if "pos_embed" in state:
        try:
            state["pos_embed"] = resample_position_table(state["pos_embed"], grid)
        except ValueError as error:
            raise BackboneWeightsError(f"{source}: key 'pos_embed': {error}") from None
    return state, layout


def find_dinov2(model: nn.Module) -> DINOv2ViT:
    """The one `DINOv2ViT` inside `model` (SmoothSA, SmoothSAVideo, SPOT, the recognition model's `discov`, the
    bare backbone)."""
    found = [m for m in model.modules() if isinstance(m, DINOv2ViT)]
    if len(found) != 1:
        what = f"{len(found)} DINOv2 backbones"
        if not found:
            what = "no DINOv2 backbone (built with backbone='patch' or backbone=False?)"
        raise BackboneWeightsError(f"{type(model).__name__} has {what}; load_dinov2 needs exactly one")
    return found[0]


def load_dinov2(model: nn.Module, source: str | os.PathLike | None = None) -> nn.Module:
    """Loads pretrained DINOv2 ViT-S/14 reg4 weights into the model's backbone (`encode_backbone.1`).

    Args:
        model: a model built with the `dinov2` backbone, or the bare backbone.
        source: a weights file (facebookresearch `.pth`, timm `.safetensors`/`.bin`, a SmoothSA checkpoint);
            None: the cached facebookresearch file (torch hub cache), else timm's file in the Hugging Face
            cache, else the download (sha256 checked) into the torch hub cache.

    Returns the model; its backbone carries `weights_file` and `weights_sha256` (the file's path and digest).
    Raises `BackboneWeightsError` naming the key and the file when a key is missing, extra or misshapen, and
    `WeightsUnavailableError` when nothing is cached and the download fails.
    """
    backbone = find_dinov2(model)
    path = Path(source) if source is not None else pretrained_file()
    state, layout = backbone_state_dict(read_weights(path), backbone.grid, str(path))
    expected = backbone.state_dict()
    problems = [f"missing key {k!r}" for k in expected if k not in state]
    problems += [f"unexpected key {k!r}" for k in state if k not in expected]
    problems += [
        f"key {k!r} has shape {tuple(v.shape)}, the backbone needs {tuple(expected[k].shape)}"
        for k, v in state.items() if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; … ({len(problems) - 8} more)" if len(problems) > 8 else "")
        raise BackboneWeightsError(f"{path} ({layout} layout) does not fit the DINOv2 backbone: {shown}")
    backbone.load_state_dict(state)
    backbone.weights_file = str(path)
    backbone.weights_sha256 = sha256_of(path)
    return model


# ------------------------------------------------------------------------------------------------
# the cache and the download


def hub_checkpoint_dir() -> Path:
    """Where torch.hub keeps downloaded weights: `$TORCH_HOME/hub/checkpoints` (default ~/.cache/torch/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def huggingface_cache_files() -> list[Path]:
    """timm's weight files in the Hugging Face hub cache, newest snapshot first."""
    if os.environ.get("HF_HUB_CACHE"):
        root = Path(os.environ["HF_HUB_CACHE"])
    elif os.environ.get("HF_HOME"):
        root = Path(os.environ["HF_HOME"]) / "hub"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub"
    snapshots = root / ("models--" + TIMM_REPO.replace("/", "--")) / "snapshots"
    if not snapshots.is_dir():
        return []
    folders = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return [folder / name for folder in folders for name in TIMM_FILES if (folder / name).is_file()]


def pretrained_file() -> Path:
    """The cached DINOv2 file, downloading it into the torch hub cache when there is none."""
    cached = hub_checkpoint_dir() / DINOV2_FILE
    if cached.is_file():
        return cached
    hf = huggingface_cache_files()
    if hf:
        return hf[0]
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Writes a temporary file beside the destination and renames it only once the sha256 matches.
        torch.hub.download_url_to_file(DINOV2_URL, str(cached), hash_prefix=DINOV2_SHA256, progress=True)
    except RuntimeError as error:  # torch.hub's hash mismatch
        raise BackboneWeightsError(f"{DINOV2_URL}: the downloaded file is not the expected one ({error})") from None
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        raise WeightsUnavailableError(
            f"cannot download the DINOv2 weights from {DINOV2_URL} ({error}); no cached copy in {cached.parent} "
            f"(or the Hugging Face cache of {TIMM_REPO}). Put {DINOV2_FILE} there, or pass "
            "--backbone-weights PATH (or --backbone-weights random to train on a random backbone on purpose)"
        ) from None
    return cached


def resolve_backbone_weights(model: nn.Module, preset, choice: str | os.PathLike | None = "auto") -> str:
    """Applies the `--backbone-weights PATH|auto|random` choice to a freshly built model; returns the banner.

    Args:
        model: built from `preset` with its backbone.
        preset: the `Preset` (or its `ModelConfig`) the model was built from.
        choice: "auto" (or None): `load_dinov2(model)`; "random": leave the backbone as built; else a path.

    Returns one line for the run's banner: the weights' file name and the first 12 hex digits of its sha256,
    `RANDOM_BANNER` for "random", or what the `patch` backbone is (it has no weights to load).
    Raises `WeightsUnavailableError` offline with nothing cached, `BackboneWeightsError` for a bad file or a
    path given to a preset whose backbone is not DINOv2.
    """
    config = getattr(preset, "model", preset)
    choice = "auto" if choice is None else os.fspath(choice)
    if config.backbone != "dinov2":
        if choice not in ("auto", "random"):
            raise BackboneWeightsError(
                f"--backbone-weights {choice}: this preset's backbone is {config.backbone!r}, which has no "
                "pretrained weights; use auto or leave the flag out"
            )
        return f"backbone {config.backbone!r}: fixed random patch projection (needs no weights)"
    if choice == "random":
        return RANDOM_BANNER
    load_dinov2(model, None if choice == "auto" else choice)
    backbone = find_dinov2(model)
    return f"backbone weights: {Path(backbone.weights_file).name} (sha256 {backbone.weights_sha256[:12]})"

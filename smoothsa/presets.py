"""Typed configurations and the registry of named presets, one per official config (docs/official.md §8).

    >>> from smoothsa.presets import get_preset, apply_overrides
    >>> preset = apply_overrides(get_preset("smoothsa_r-coco"), ["optim.lr=1e-4", "model.num_slots=5"])

Preset names match the official config files; `smoothsav_c-movi_d` runs MOVi-E's settings on MOVi-D data
(the official results table has it, its config is not published).
"""
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from smoothsa.cli import UserError


@dataclass
class ModelConfig:
    """What `build_model` builds.

    arch: "smoothsa" (image), "smoothsa_video", "spot", "recognition" or "spot_distill" (SPOT's second stage; the
        other fields describe its student).
    num_slots: S; None for box-conditioned video models (S = padded number of objects in the batch).
    initializer: "shared_preheated", "mlp_preheated" (first-frame boxes), "shared" (SPOT) or "separat" (SPOT's
        distillation student).
    trunc_bp: "bi-level" or None (full back-propagation through the iterations).
    num_iter: slot-attention iterations (on frame 0 for video; later frames use 1).
    transit_dt: `RSFQTransit` window (video only).
    decoder: "arrand" (SmoothSA) or "ar9" (SPOT).
    fused: fused slot-attention kernels; None reads SMOOTHSA_FUSED (on by default).
    discovery: recognition: the preset of the frozen discovery model; spot_distill: the preset of the teacher.
    num_classes: recognition only, class logits (category ids 1..ncls−1).
    backbone: "dinov2" (the paper's frozen ViT-S/14 reg4) or "patch" (a fixed random patch projection that needs
        no download; see `smoothsa.backbone.PatchFeatures`).
    patch_position: "patch" backbone only, the scale of the sin-cos position code added to its features (0: none).
    image_size, grid: input side and token grid side (N = grid²); the DINOv2 backbone needs 256 and 16.
    feature_dim, slot_dim: Dv and Ds.
    decoder_layers: transformer layers of the decoder.
    decoder_p: "arrand" decoder, the probability of a uniformly random visible-token count in training (else
        `smoothsa.decoders.SHORT_KEEP` tokens are visible); the official 0.5.
    decoder_pe_init: "arrand" decoder, its positional table's start: "trunc_normal" (official) or "sincos".
    """

    arch: Literal["smoothsa", "smoothsa_video", "spot", "spot_distill", "recognition"] = "smoothsa"
    num_slots: int | None = 7
    initializer: Literal["shared_preheated", "mlp_preheated", "shared", "separat"] = "shared_preheated"
    trunc_bp: Literal["bi-level"] | None = "bi-level"
    num_iter: int = 3
    transit_dt: int | None = None
    decoder: Literal["arrand", "ar9"] = "arrand"
    fused: bool | None = None
    discovery: str | None = None
    num_classes: int | None = None
    backbone: Literal["dinov2", "patch"] = "dinov2"
    image_size: int = 256
    grid: int = 16
    feature_dim: int = 384
    slot_dim: int = 256
    decoder_layers: int = 4
    patch_position: float = 0.0
    decoder_p: float = 0.5
    decoder_pe_init: Literal["trunc_normal", "sincos"] = "trunc_normal"


@dataclass
class DataConfig:
    """dataset: "clevrtex", "coco", "voc", "movi_c", "movi_d", "movi_e", "ytvis", "ytvis_hq", "synthetic", or "folder" /
    "folder_video" (your own unlabelled images or videos, `smoothsa.dataio.folder`).
    clip_len: training clip length (video). repeat_long: YTVIS lists a video len//30 times when longer (0 off).
    with_bbox / with_clazz: load boxes and classes (recognition, MOVi conditioning).
    coco_mode: COCO ground truth, "instance" (stuff merged into one background channel first, then the things:
    the official default, which no official config changes) or "panoptic" (every segment its own channel)."""

    dataset: Literal[
        "clevrtex", "coco", "voc", "movi_c", "movi_d", "movi_e", "ytvis", "ytvis_hq", "synthetic", "synthetic_video",
        "folder", "folder_video",
    ] = "coco"
    clip_len: int | None = None
    repeat_long: int = 0
    with_bbox: bool = False
    with_clazz: bool = False
    coco_mode: Literal["instance", "panoptic"] = "instance"


@dataclass
class OptimConfig:
    """The training procedure of docs/official.md §4. clip_type: "l2" or "inf"; clip_norm None: no clipping.
    validations: how many times a run validates, evenly spaced (the official val_interval = total/40).
    preheat_detach: the share of the first steps during which the preheated initializer reads detached features,
        so the preheat loss cannot reach `encode_project` (official 0.1; 1: the whole run)."""

    total_steps: int = 100_000
    validations: int = 40
    batch_size: int = 32
    val_batch_size: int = 32
    lr: float = 2e-4
    clip_norm: float | None = 1.0
    clip_type: Literal["l2", "inf"] = "l2"
    loss_weights: dict[str, float] = field(default_factory=lambda: {"recon": 1.0, "preheat": 100.0})
    seed: int = 42
    preheat_detach: float = 0.1


@dataclass
class Preset:
    name: str
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig


def _image(name: str, dataset: str, slots: int, steps: int) -> Preset:
    return Preset(name, ModelConfig(num_slots=slots), DataConfig(dataset), OptimConfig(total_steps=steps))


def _spot(name: str, dataset: str, slots: int, steps: int) -> Preset:
    model = ModelConfig(arch="spot", num_slots=slots, initializer="shared", trunc_bp=None, decoder="ar9")
    optim = OptimConfig(total_steps=steps, clip_norm=0.3, clip_type="inf", loss_weights={"recon": 1.0})
    return Preset(name, model, DataConfig(dataset), optim)


def _video(name: str, dataset: str, boxes: bool, clip: int) -> Preset:
    model = ModelConfig(
        arch="smoothsa_video",
        num_slots=None if boxes else 7,
        initializer="mlp_preheated" if boxes else "shared_preheated",
        transit_dt=clip,
    )
    data = DataConfig(dataset, clip_len=clip, repeat_long=0 if boxes else 30, with_bbox=boxes)
    optim = OptimConfig(
        total_steps=50_000, batch_size=8, val_batch_size=8 if boxes else 1, lr=5e-5, clip_norm=0.05,
        loss_weights={"recon": 1.0, "ssc": 0.5, "preheat": 100.0},
    )
    return Preset(name, model, data, optim)


def _recognition(name: str, discovery: Preset, classes: int, steps: int) -> Preset:
    model = dataclasses.replace(discovery.model, arch="recognition", discovery=discovery.name, num_classes=classes)
    data = dataclasses.replace(discovery.data, with_bbox=True, with_clazz=True)
    optim = dataclasses.replace(
        discovery.optim, total_steps=steps, lr=1e-3, clip_norm=None, loss_weights={"ce": 1.0, "l1": 1.0}
    )
    return Preset(name, model, data, optim)


def _spot_distill(name: str, teacher: Preset) -> Preset:
    """SPOT's second stage (docs/official.md §2.9b): a student SPOT with per-slot means, bi-level truncation and
    DINOv2 blocks 8–11 trained, taught by a trained `teacher`; the teacher's data and training procedure, plus the
    attention-matching loss."""
    model = dataclasses.replace(
        teacher.model, arch="spot_distill", initializer="separat", trunc_bp="bi-level", discovery=teacher.name
    )
    data = dataclasses.replace(teacher.data, coco_mode="instance")
    optim = dataclasses.replace(teacher.optim, loss_weights={"recon": 1.0, "match": 0.005})
    return Preset(name, model, data, optim)


def _demo() -> Preset:
    """The embedded demo: SmoothSA at a size a 2-core CPU trains in minutes, on synthetic scenes of coloured
    shapes (`smoothsa.dataio.synthetic`), with `PatchFeatures` standing in for DINOv2 (no download).

    Where it departs from the official configs, and why (measured in the README's demo section):
    * `patch_position`: the patch features carry no position, DINOv2's do; without it neither the decoder nor
      the slots can tell where a masked token lies, and nothing pays for one object per slot.
    * `decoder_pe_init="sincos"`, `decoder_p=0`: the decoder's table starts as a position code instead of noise
      that 1,800 steps cannot train away, and every sample shows only 24 of the 256 tokens, so masked tokens
      have to come from the slots rather than from visible neighbours.
    * `preheat_detach=1`: the preheat loss (×100) is ~40 times the reconstruction loss at this size; once it
      reaches `encode_project` it reshapes the features for the initializer and the grouping decays.
    * 5 slots for 2–4 objects and the ground (7 split the ground), lr 2e-3, 1,800 steps.
    """
    model = ModelConfig(
        num_slots=5, backbone="patch", image_size=128, grid=16, feature_dim=64, slot_dim=64, decoder_layers=1,
        patch_position=0.15, decoder_p=0.0, decoder_pe_init="sincos",
    )
    optim = OptimConfig(total_steps=1800, batch_size=32, val_batch_size=64, lr=2e-3, validations=6, preheat_detach=1.0)
    return Preset("demo", model, DataConfig("synthetic"), optim)


def _registry() -> dict[str, Preset]:
    presets = [
        _demo(),
        _image("smoothsa_r-clevrtex", "clevrtex", 11, 50_000),
        _image("smoothsa_r-coco", "coco", 7, 100_000),
        _image("smoothsa_r-voc", "voc", 6, 50_000),
        _video("smoothsav_c-movi_c", "movi_c", True, 6),
        _video("smoothsav_c-movi_d", "movi_d", True, 6),
        _video("smoothsav_c-movi_e", "movi_e", True, 6),
        _video("smoothsav_r-ytvis", "ytvis", False, 5),
        _video("smoothsav_r-ytvis_hq", "ytvis_hq", False, 5),
        _spot("spot_r-clevrtex", "clevrtex", 11, 50_000),
        _spot("spot_r-coco", "coco", 7, 100_000),
        _spot("spot_r-voc", "voc", 6, 50_000),
    ]
    by_name = {p.name: p for p in presets}
    presets += [
        _recognition("smoothsa_r_recogn-coco", by_name["smoothsa_r-coco"], 91, 10_000),
        _recognition("smoothsav_r_recogn-ytvis", by_name["smoothsav_r-ytvis"], 41, 5_000),
        _recognition("smoothsav_r_recogn-ytvis_hq", by_name["smoothsav_r-ytvis_hq"], 41, 5_000),
        _recognition("spot_r_recogn-coco", by_name["spot_r-coco"], 91, 10_000),
    ]
    presets.append(_spot_distill("spot_r_distill-coco", by_name["spot_r-coco"]))
    return {p.name: p for p in presets}


PRESETS: dict[str, Preset] = _registry()


def register_preset(preset: Preset) -> None:
    """Adds a preset to the registry (checked by `validate`); a name may be registered once."""
    validate(preset)
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    PRESETS[preset.name] = preset


class UnknownPreset(UserError, KeyError):
    """A preset name that is not in the registry (a `KeyError` too, for code that looks names up)."""


def get_preset(name: str) -> Preset:
    """A fresh copy of the named preset; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise UnknownPreset(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return _copy(PRESETS[name])


def _copy(preset: Preset) -> Preset:
    return Preset(
        preset.name,
        dataclasses.replace(preset.model),
        dataclasses.replace(preset.data),
        dataclasses.replace(preset.optim, loss_weights=dict(preset.optim.loss_weights)),
    )


def _describe(annotation) -> str:
    """A field type as a user reads it: `one of 'l2', 'inf'`, `int or None`."""
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _convert(text: str, annotation, where: str):
    """Parses a command-line value into the field's declared type (int, float, bool, str, Literal, None unions)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(text, arg, where)
            except ValueError:
                continue
        raise UserError(f"--set {where}={text}: expected {_describe(annotation)}")
    if typing.get_origin(annotation) is Literal:
        if text not in args:
            raise UserError(f"--set {where}={text}: expected {_describe(annotation)}")
        return text
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--set {where}={text}: expected a boolean, got {text!r}")
    if annotation in (int, float, str):
        try:
            return annotation(text)
        except ValueError:
            raise UserError(f"--set {where}={text}: expected {annotation.__name__}, got {text!r}") from None
    if typing.get_origin(annotation) is dict:
        raise UserError(f"--set {where}: set dict entries one by one, e.g. optim.loss_weights.preheat=100")
    raise UserError(f"--set {where}: cannot set a field of type {annotation}")


def apply_overrides(preset: Preset, assignments: list[str]) -> Preset:
    """Returns a copy of `preset` with `section.field=value` assignments applied (and
    `optim.loss_weights.<name>=<float>`), checked by `validate`. Unknown sections or fields, values of the wrong
    type and values out of range are `UserError`s that name the field and what it accepts."""
    preset = _copy(preset)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise UserError(f"--set {assignment!r} is not of the form section.field=value")
        parts = key.strip().split(".")
        sections = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset) if f.name != "name"}
        if parts[0] not in sections or len(parts) < 2:
            raise UserError(f"--set {assignment!r}: the key must start with one of {', '.join(sections)}")
        section = sections[parts[0]]
        fields = {f.name: f for f in dataclasses.fields(section)}
        if parts[1] not in fields:
            raise UserError(f"--set {assignment!r}: {parts[0]} has no field {parts[1]!r}; fields: {', '.join(fields)}")
        if parts[1] == "loss_weights" and len(parts) == 3:
            section.loss_weights[parts[2]] = _convert(text.strip(), float, key)
            continue
        if len(parts) != 2:
            raise UserError(f"--set {assignment!r}: too many dots")
        hints = typing.get_type_hints(type(section))
        setattr(section, parts[1], _convert(text.strip(), hints[parts[1]], key))
    validate(preset)
    return preset


def _at_least(value, low, name: str, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if value is None or value < low:
        raise UserError(f"{name} must be at least {low}, got {value}")


def _within(value: float, low: float, high: float, name: str) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise UserError(f"{name} must lie in [{low}, {high}], got {value}")


def _non_negative(value: float, name: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{name} must be a finite number ≥ 0, got {value}")


def validate(preset: Preset) -> Preset:
    """Checks every field against its declared choices and range; the first bad one is a one-line `UserError`."""
    for section_name in ("model", "data", "optim"):
        section = getattr(preset, section_name)
        for name, annotation in typing.get_type_hints(type(section)).items():
            value = getattr(section, name)
            choices = [a for a in (annotation, *typing.get_args(annotation)) if typing.get_origin(a) is Literal]
            if choices and not (value is None and type(None) in typing.get_args(annotation)):
                if value not in typing.get_args(choices[0]):
                    raise UserError(f"{section_name}.{name} must be {_describe(annotation)}, got {value!r}")
    model, data, optim = preset.model, preset.data, preset.optim
    _at_least(model.num_slots, 1, "model.num_slots", none_ok=model.initializer == "mlp_preheated")
    for name in ("num_iter", "image_size", "grid", "feature_dim", "slot_dim", "decoder_layers"):
        _at_least(getattr(model, name), 1, f"model.{name}")
    _at_least(model.transit_dt, 1, "model.transit_dt", none_ok=model.arch != "smoothsa_video")
    _at_least(model.num_classes, 2, "model.num_classes", none_ok=model.arch != "recognition")
    _within(model.decoder_p, 0, 1, "model.decoder_p")
    _non_negative(model.patch_position, "model.patch_position")
    _at_least(data.clip_len, 1, "data.clip_len", none_ok=True)
    _at_least(data.repeat_long, 0, "data.repeat_long")
    for name in ("total_steps", "validations", "batch_size", "val_batch_size"):
        _at_least(getattr(optim, name), 1, f"optim.{name}")
    if not (math.isfinite(optim.lr) and optim.lr > 0):
        raise UserError(f"optim.lr must be a finite number > 0, got {optim.lr}")
    if optim.clip_norm is not None and not (math.isfinite(optim.clip_norm) and optim.clip_norm > 0):
        raise UserError(f"optim.clip_norm must be a finite number > 0 or None (no clipping), got {optim.clip_norm}")
    for name, weight in optim.loss_weights.items():
        _non_negative(weight, f"optim.loss_weights.{name}")
    _within(optim.preheat_detach, 0, 1, "optim.preheat_detach")
    if not 0 <= optim.seed < 2**32 - 2**16:  # numpy seeds are 32-bit; each rank adds its number
        raise UserError(f"optim.seed must lie in [0, {2**32 - 2**16}), got {optim.seed}")
    return preset


def preset_to_dict(preset: Preset) -> dict:
    """A JSON-ready dict of the resolved configuration (written next to checkpoints)."""
    return dataclasses.asdict(preset)


def preset_from_dict(config: dict) -> Preset:
    """The inverse of `preset_to_dict` (a saved `config.json`), checked by `validate`; unknown keys are errors."""
    sections = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig}
    try:
        values = {name: kind(**config[name]) for name, kind in sections.items()}
        return validate(Preset(config["name"], **values))
    except (KeyError, TypeError) as error:
        raise UserError(f"not a preset configuration ({error}); was it written by another version?") from None

"""Typed configurations and the registry of named presets, one per official config (SPEC §8).

    >>> from smoothsa.presets import get_preset, apply_overrides
    >>> preset = apply_overrides(get_preset("smoothsa_r-coco"), ["optim.lr=1e-4", "model.num_slots=5"])

Preset names match the official config files; `smoothsav_c-movi_d` runs MOVi-E's settings on MOVi-D data
(the official results table has it, its config is not published).
"""
import dataclasses
import types
import typing
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """What `build_model` builds.

    arch: "smoothsa" (image), "smoothsa_video", "spot" or "recognition".
    num_slots: S; None for box-conditioned video models (S = padded number of objects in the batch).
    initializer: "shared_preheated", "mlp_preheated" (first-frame boxes) or "shared" (SPOT).
    trunc_bp: "bi-level" or None (full back-propagation through the iterations).
    num_iter: slot-attention iterations (on frame 0 for video; later frames use 1).
    transit_dt: `RSFQTransit` window (video only).
    decoder: "arrand" (SmoothSA) or "ar9" (SPOT).
    fused: fused slot-attention kernels; None reads SMOOTHSA_FUSED (on by default).
    discovery: recognition only, the preset of the frozen discovery model.
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

    arch: str = "smoothsa"
    num_slots: int | None = 7
    initializer: str = "shared_preheated"
    trunc_bp: str | None = "bi-level"
    num_iter: int = 3
    transit_dt: int | None = None
    decoder: str = "arrand"
    fused: bool | None = None
    discovery: str | None = None
    num_classes: int | None = None
    backbone: str = "dinov2"
    image_size: int = 256
    grid: int = 16
    feature_dim: int = 384
    slot_dim: int = 256
    decoder_layers: int = 4
    patch_position: float = 0.0
    decoder_p: float = 0.5
    decoder_pe_init: str = "trunc_normal"


@dataclass
class DataConfig:
    """dataset: "clevrtex", "coco", "voc", "movi_c", "movi_d", "movi_e", "ytvis", "ytvis_hq", "synthetic" or "folder"
    (your own unlabelled images or videos, `smoothsa.dataio.folder`).
    clip_len: training clip length (video). repeat_long: YTVIS lists a video len//30 times when longer (0 off).
    with_bbox / with_clazz: load boxes and classes (recognition, MOVi conditioning)."""

    dataset: str = "coco"
    clip_len: int | None = None
    repeat_long: int = 0
    with_bbox: bool = False
    with_clazz: bool = False
    coco_mode: str = "panoptic"


@dataclass
class OptimConfig:
    """The training procedure of SPEC §4. clip_type: "l2" or "inf"; clip_norm None: no clipping.
    validations: how many times a run validates, evenly spaced (the official val_interval = total/40).
    preheat_detach: the share of the first steps during which the preheated initializer reads detached features,
        so the preheat loss cannot reach `encode_project` (official 0.1; 1: the whole run)."""

    total_steps: int = 100_000
    validations: int = 40
    batch_size: int = 32
    val_batch_size: int = 32
    lr: float = 2e-4
    clip_norm: float | None = 1.0
    clip_type: str = "l2"
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
    data = dataclasses.replace(discovery.data, with_bbox=True, with_clazz=True, coco_mode="instance")
    optim = dataclasses.replace(
        discovery.optim, total_steps=steps, lr=1e-3, clip_norm=None, loss_weights={"ce": 1.0, "l1": 1.0}
    )
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
    return {p.name: p for p in presets}


PRESETS: dict[str, Preset] = _registry()


def register_preset(preset: Preset) -> None:
    """Adds a preset to the registry (e.g. the embedded demo); a name may be registered once."""
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    PRESETS[preset.name] = preset


def get_preset(name: str) -> Preset:
    """A fresh copy of the named preset; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return _copy(PRESETS[name])


def _copy(preset: Preset) -> Preset:
    return Preset(
        preset.name,
        dataclasses.replace(preset.model),
        dataclasses.replace(preset.data),
        dataclasses.replace(preset.optim, loss_weights=dict(preset.optim.loss_weights)),
    )


def _convert(text: str, annotation, where: str):
    """Parses a command-line value into the field's declared type (int, float, bool, str, None unions)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null"):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(text, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: cannot parse {text!r} as {annotation}")
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected a boolean, got {text!r}")
    if annotation in (int, float, str):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(f"{where}: expected {annotation.__name__}, got {text!r}") from None
    if typing.get_origin(annotation) is dict:
        raise ValueError(f"{where}: set dict entries one by one, e.g. optim.loss_weights.preheat=100")
    raise ValueError(f"{where}: cannot set a field of type {annotation}")


def apply_overrides(preset: Preset, assignments: list[str]) -> Preset:
    """Returns a copy of `preset` with `section.field=value` assignments applied (and
    `optim.loss_weights.<name>=<float>`). Unknown sections or fields are errors that list the valid ones."""
    preset = _copy(preset)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise ValueError(f"override {assignment!r} is not of the form section.field=value")
        parts = key.strip().split(".")
        sections = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset) if f.name != "name"}
        if parts[0] not in sections or len(parts) < 2:
            raise ValueError(f"override {assignment!r}: the key must start with one of {', '.join(sections)}")
        section = sections[parts[0]]
        fields = {f.name: f for f in dataclasses.fields(section)}
        if parts[1] not in fields:
            raise ValueError(f"override {assignment!r}: {parts[0]} has no field {parts[1]!r}; fields: {', '.join(fields)}")
        if parts[1] == "loss_weights" and len(parts) == 3:
            section.loss_weights[parts[2]] = _convert(text, float, key)
            continue
        if len(parts) != 2:
            raise ValueError(f"override {assignment!r}: too many dots")
        hints = typing.get_type_hints(type(section))
        setattr(section, parts[1], _convert(text.strip(), hints[parts[1]], key))
    return preset


def preset_to_dict(preset: Preset) -> dict:
    """A JSON-ready dict of the resolved configuration (written next to checkpoints)."""
    return dataclasses.asdict(preset)

"""`build_model`: a preset name (or `ModelConfig`) → the model, with the official module layout; `compile_model`:
the parts of it that `torch.compile` should trace."""
import dataclasses

import torch.nn as nn

from smoothsa.backbone import PatchFeatures, dinov2_backbone
from smoothsa.decoders import AR9TransformerDecoder, ARRandTransformerDecoder
from smoothsa.initializers import NormalMlpPreheated, NormalSeparat, NormalShared, NormalSharedPreheated
from smoothsa.mlp import mlp
from smoothsa.models import SPOT, SmoothSA, SmoothSAVideo
from smoothsa.presets import ModelConfig, get_preset
from smoothsa.slot_attention import SlotAttention
from smoothsa.transit import RSFQTransit


def build_model(name: str | ModelConfig, backbone: bool = True, **overrides) -> nn.Module:
    """Builds the model of a preset.

    Args:
        name: a preset name (see `smoothsa.presets.PRESETS`) or a `ModelConfig`.
        backbone: include the frozen DINOv2 backbone (input: images); False: the input is the feature map
            (B, [T,] 384, 16, 16) and the 173 backbone keys are absent from the state_dict.
        overrides: `ModelConfig` fields to change, e.g. `num_slots=5`, `fused=False`, `trunc_bp=None`.
    """
    config = get_preset(name).model if isinstance(name, str) else dataclasses.replace(name)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"build_model: unknown override(s) {sorted(unknown)}; ModelConfig fields: {sorted(known)}")
    config = dataclasses.replace(config, **overrides)
    if config.arch == "recognition":
        from smoothsa.recognition import ObjDiscovRecogn

        discovery = dataclasses.replace(config, arch=_discovery_arch(config), discovery=None, num_classes=None)
        return ObjDiscovRecogn(_build_discovery(discovery, backbone), config.num_classes, slot_dim=config.slot_dim)
    if config.arch == "spot_distill":
        return _build_distill(config, backbone)
    return _build_discovery(config, backbone)


def _build_distill(config: ModelConfig, backbone: bool) -> nn.Module:
    """SPOT's second stage (docs/official.md §2.9b). `config` describes the student; the teacher is the same
    model with the initializer and truncation of the `discovery` preset, as the official config derives the
    student from the teacher by changing just these (and `finetune`)."""
    from smoothsa.distill import SPOTDistill

    if config.discovery is None:
        raise ValueError("build_model: a distillation model needs `discovery`, the preset of its SPOT teacher")
    teacher_model = get_preset(config.discovery).model
    if teacher_model.arch != "spot":
        raise ValueError(f"build_model: the teacher {config.discovery!r} is not a SPOT (arch {teacher_model.arch!r})")
    teacher = dataclasses.replace(
        config, arch="spot", discovery=None, initializer=teacher_model.initializer, trunc_bp=teacher_model.trunc_bp
    )
    student = dataclasses.replace(config, arch="spot", discovery=None)
    return SPOTDistill(_build_discovery(teacher, backbone), _build_discovery(student, backbone, finetune=True))


def compile_model(model: nn.Module, **options) -> nn.Module:
    """Compiles `model` in place with `torch.compile(**options)` (e.g. `mode="reduce-overhead"`) and returns it.

    In place (`nn.Module.compile`), so the state_dict keeps the official keys (no `_orig_mod.` prefix). Every
    discovery model traces as one graph in training, with no graph break. A recognition model compiles its
    frozen discovery model only: the Hungarian matching that follows runs on the host (scipy) by design, and the
    probe, an MLP on the K matched slots (K differs per batch), stays eager.

    Box-conditioned video models take as many slots as the batch has (padded) boxes; `smoothsa.tasks.ImageDiscovery.inputs`
    marks that axis dynamic, so one graph serves every slot count. Switching between `train()` and `eval()`
    compiles a second graph once (the mode is part of the trace); the two are then reused.
    """
    from smoothsa.recognition import ObjDiscovRecogn

    (model.discov if isinstance(model, ObjDiscovRecogn) else model).compile(**options)
    return model


def _discovery_arch(config: ModelConfig) -> str:
    if config.discovery is None or config.num_classes is None:
        raise ValueError("build_model: a recognition model needs `discovery` and `num_classes`")
    return get_preset(config.discovery).model.arch


def _build_discovery(config: ModelConfig, backbone: bool, finetune: bool = False) -> nn.Module:
    archs = {"smoothsa": SmoothSA, "smoothsa_video": SmoothSAVideo, "spot": SPOT}
    if config.arch not in archs:
        raise ValueError(
            f"build_model: unknown arch {config.arch!r}; known: {sorted(archs)}, 'recognition' and 'spot_distill'"
        )
    dv, ds = config.feature_dim, config.slot_dim
    parts = dict(
        encode_backbone=_backbone(config) if backbone else None,
        encode_project=mlp(dv, [dv, dv], ln="pre"),
        initializ=_initializer(config),
        aggregat=SlotAttention(config.num_iter, ds, 4 * ds, 0.0, dv, trunc_bp=config.trunc_bp, fused=config.fused),
        decode=_decoder(config),
    )
    if config.arch == "smoothsa_video":
        if config.transit_dt is None:
            raise ValueError("build_model: a video model needs transit_dt")
        parts["transit"] = RSFQTransit(config.transit_dt, dv, ds)
    grid = (config.grid, config.grid)
    if finetune:
        parts["finetune"] = True
    return archs[config.arch](**parts, resolution=grid, feature_dim=dv, image_size=config.image_size)


def _backbone(config: ModelConfig) -> nn.Module:
    if config.backbone == "dinov2":
        if (config.image_size, config.grid, config.feature_dim) != (256, 16, 384):
            raise ValueError(
                "build_model: the DINOv2 backbone needs image_size=256, grid=16, feature_dim=384, got "
                f"{config.image_size}, {config.grid}, {config.feature_dim}"
            )
        if config.patch_position:
            raise ValueError("build_model: patch_position applies to the 'patch' backbone only")
        return dinov2_backbone()
    if config.backbone == "patch":
        return PatchFeatures(config.image_size, config.grid, config.feature_dim, position=config.patch_position)
    raise ValueError(f"build_model: unknown backbone {config.backbone!r}; known: dinov2, patch")


def _initializer(config: ModelConfig) -> nn.Module:
    dv, ds = config.feature_dim, config.slot_dim
    if config.initializer == "mlp_preheated":
        return NormalMlpPreheated(4, (ds, ds), dv)
    if config.num_slots is None or config.num_slots < 1:
        raise ValueError(f"build_model: initializer {config.initializer!r} needs num_slots >= 1, got {config.num_slots}")
    if config.initializer == "shared_preheated":
        return NormalSharedPreheated(config.num_slots, ds, dv)
    if config.initializer == "shared":
        return NormalShared(config.num_slots, ds)
    if config.initializer == "separat":
        return NormalSeparat(config.num_slots, ds)
    raise ValueError(
        f"build_model: unknown initializer {config.initializer!r}; known: shared_preheated, mlp_preheated, shared, "
        "separat"
    )


def _decoder(config: ModelConfig) -> nn.Module:
    dv, ds, layers = config.feature_dim, config.slot_dim, config.decoder_layers
    if config.decoder == "arrand":
        return ARRandTransformerDecoder(
            config.grid**2, dv, ds, layers, 4, 4 * dv, p=config.decoder_p, pe_init=config.decoder_pe_init
        )
    if (config.decoder_p, config.decoder_pe_init) != (0.5, "trunc_normal"):
        raise ValueError("build_model: decoder_p and decoder_pe_init apply to the 'arrand' decoder only")
    if config.decoder == "ar9":
        return AR9TransformerDecoder((config.grid, config.grid), dv, ds, layers, 4, 4 * dv)
    raise ValueError(f"build_model: unknown decoder {config.decoder!r}; known: arrand, ar9")

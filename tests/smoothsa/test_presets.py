"""Every preset builds a model whose state_dict has exactly the official checkpoint keys and shapes.

The expected key lists are written out here from docs/official.md §2.13, independently of the model code."""
import json
import typing

import pytest

import smoothsa
from smoothsa.cli import UserError
from smoothsa.dataio import DATASETS
from smoothsa.presets import (
    PRESETS, DataConfig, ModelConfig, OptimConfig, apply_overrides, get_preset, preset_from_dict, preset_to_dict, validate,
)


def backbone_keys() -> dict:
    keys = {
        "cls_token": (1, 1, 384),
        "reg_token": (1, 4, 384),
        "pos_embed": (1, 256, 384),
        "patch_embed.proj.weight": (384, 3, 14, 14),
        "patch_embed.proj.bias": (384,),
    }
    for i in range(12):
        block = {
            "norm1.weight": (384,), "norm1.bias": (384,), "attn.qkv.weight": (1152, 384), "attn.qkv.bias": (1152,),
            "attn.proj.weight": (384, 384), "attn.proj.bias": (384,), "ls1.gamma": (384,), "norm2.weight": (384,),
            "norm2.bias": (384,), "mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,),
            "mlp.fc2.weight": (384, 1536), "mlp.fc2.bias": (384,), "ls2.gamma": (384,),
        }
        keys |= {f"blocks.{i}.{k}": v for k, v in block.items()}
    return {f"m.encode_backbone.1.{k}": v for k, v in keys.items()}


def attention_layer(prefix: str, d: int, ff: int, norms: list[str]) -> dict:
    keys = {
        "self_attn.in_proj_weight": (3 * d, d), "self_attn.out_proj.weight": (d, d),
        "multihead_attn.in_proj_weight": (3 * d, d), "multihead_attn.out_proj.weight": (d, d),
        "linear1.weight": (ff, d), "linear2.weight": (d, ff),
    } | {f"{n}.weight": (d,) for n in norms}
    return {prefix + k: v for k, v in keys.items()}


PROJECT = {
    "m.encode_project.0.weight": (384,), "m.encode_project.0.bias": (384,), "m.encode_project.1.weight": (384, 384),
    "m.encode_project.1.bias": (384,), "m.encode_project.3.weight": (384, 384), "m.encode_project.3.bias": (384,),
}
SA = {
    "m.aggregat.norm1q.weight": (256,), "m.aggregat.norm1q.bias": (256,), "m.aggregat.proj_q.weight": (256, 256),
    "m.aggregat.norm1kv.weight": (384,), "m.aggregat.norm1kv.bias": (384,), "m.aggregat.proj_k.weight": (256, 384),
    "m.aggregat.proj_v.weight": (256, 384), "m.aggregat.rnn.weight_ih": (768, 256),
    "m.aggregat.rnn.weight_hh": (768, 256), "m.aggregat.rnn.bias_ih": (768,), "m.aggregat.rnn.bias_hh": (768,),
    "m.aggregat.norm2.weight": (256,), "m.aggregat.norm2.bias": (256,), "m.aggregat.ffn.0.weight": (1024, 256),
    "m.aggregat.ffn.0.bias": (1024,), "m.aggregat.ffn.2.weight": (256, 1024), "m.aggregat.ffn.2.bias": (256,),
}
PREHEAT = {"m.initializ.qproj_kv.weight": (256, 384), "m.initializ.qproj_kv.bias": (256,)} | attention_layer(
    "m.initializ.qinit.", 256, 1024, ["norm1", "norm3"]
)
SHARED_PREHEATED = {
    "m.initializ.mean": (1, 1, 256), "m.initializ.logstd": (1, 1, 256), "m.initializ.logstd2": (1, 1, 256),
    "m.initializ.detach_flag": (),
} | PREHEAT
MLP_PREHEATED = {
    "m.initializ.logstd": (1, 1, 256), "m.initializ.logstd2": (1, 1, 256), "m.initializ.detach_flag": (),
    "m.initializ.mlp.0.weight": (256, 4), "m.initializ.mlp.0.bias": (256,), "m.initializ.mlp.2.weight": (256, 256),
    "m.initializ.mlp.2.bias": (256,), "m.initializ.mlp.3.weight": (256,), "m.initializ.mlp.3.bias": (256,),
} | PREHEAT
PROJECTIONS = {
    "m.decode.project1.0.weight": (384, 384), "m.decode.project1.1.weight": (384,), "m.decode.project1.1.bias": (384,),
    "m.decode.project2.0.weight": (384, 256), "m.decode.project2.1.weight": (384,), "m.decode.project2.1.bias": (384,),
    "m.decode.norm0.weight": (384,),
}
LAYERS = {}
for layer in range(4):
    norms = ["norm2", "norm3"] if layer == 0 else ["norm1", "norm2", "norm3"]
    LAYERS |= attention_layer(f"m.decode.backbone.layers.{layer}.", 384, 1536, norms)
ARRAND = {"m.decode.mask_token": (1, 1, 384), "m.decode.posit_embed._pe": (1, 256, 384)} | PROJECTIONS | LAYERS
AR9 = {"m.decode.bos": (9, 1, 1, 384)} | PROJECTIONS | LAYERS


def transit(dt: int) -> dict:
    return {
        "m.transit.te.weight": (dt, 256), "m.transit.proji.weight": (256, 384), "m.transit.proji.bias": (256,),
    } | attention_layer("m.transit.transit.", 256, 1024, ["norm1", "norm2", "norm3"])


def recognition(discovery: dict, ncls: int) -> dict:
    keys = {k.replace("m.", "m.discov.", 1): v for k, v in discovery.items()}
    return keys | {
        "m.recogn.0.weight": (512, 256), "m.recogn.0.bias": (512,), "m.recogn.3.weight": (ncls + 4, 512),
        "m.recogn.3.bias": (ncls + 4,),
    }


IMAGE = PROJECT | SHARED_PREHEATED | SA | ARRAND
MOVI = PROJECT | MLP_PREHEATED | SA | ARRAND | transit(6)
YTVIS = PROJECT | SHARED_PREHEATED | SA | ARRAND | transit(5)
SPOT = PROJECT | {"m.initializ.mean": (1, 1, 256), "m.initializ.logstd": (1, 1, 256)} | SA | AR9
EXPECTED = {
    "smoothsa_r-clevrtex": IMAGE, "smoothsa_r-coco": IMAGE, "smoothsa_r-voc": IMAGE,
    "smoothsav_c-movi_c": MOVI, "smoothsav_c-movi_d": MOVI, "smoothsav_c-movi_e": MOVI,
    "smoothsav_r-ytvis": YTVIS, "smoothsav_r-ytvis_hq": YTVIS,
    "spot_r-clevrtex": SPOT, "spot_r-coco": SPOT, "spot_r-voc": SPOT,
    "smoothsa_r_recogn-coco": recognition(IMAGE, 91), "smoothsav_r_recogn-ytvis": recognition(YTVIS, 41),
    "smoothsav_r_recogn-ytvis_hq": recognition(YTVIS, 41), "spot_r_recogn-coco": recognition(SPOT, 91),
}
COUNTS = {"smoothsa_r-coco": (81, 254), "smoothsav_c-movi_c": (98, 271), "smoothsav_r-ytvis": (93, 266), "spot_r-coco": (68, 241)}


def test_every_official_preset_has_an_expected_key_list():
    # The distillation model's 655 keys (teacher and student) are derived and checked in test_distill.py.
    assert set(EXPECTED) == set(PRESETS) - {"demo", "spot_r_distill-coco"}


def test_demo_keeps_the_official_key_names_at_its_own_sizes():
    ours = smoothsa.official_state_dict(smoothsa.build_model("demo", backbone=False))
    one_layer = [k for k in IMAGE if not k.startswith(("m.decode.backbone.layers.1.", "m.decode.backbone.layers.2.",
                                                         "m.decode.backbone.layers.3."))]  # the demo decodes with one layer
    assert list(ours) == one_layer
    assert ours["m.aggregat.proj_q.weight"].shape == (64, 64) and ours["m.decode.posit_embed._pe"].shape == (1, 256, 64)


def test_backbone_has_173_keys():
    assert len(backbone_keys()) == 173


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("backbone", [False, True], ids=["features", "backbone"])
def test_state_dict_matches_official_keys_and_shapes(name, backbone):
    model = smoothsa.build_model(name, backbone=backbone)
    ours = {k: tuple(v.shape) for k, v in smoothsa.official_state_dict(model).items()}
    expected = dict(EXPECTED[name])
    if backbone:
        back = backbone_keys()
        if name.split("-")[0].endswith("_recogn"):
            back = {k.replace("m.", "m.discov.", 1): v for k, v in back.items()}
        expected = back | expected  # the backbone keys come first in a real checkpoint
    assert set(ours) == set(expected), (sorted(set(ours) - set(expected))[:5], sorted(set(expected) - set(ours))[:5])
    assert ours == expected
    if name in COUNTS:
        assert len(ours) == COUNTS[name][int(backbone)]
    if backbone:
        assert list(ours)[: 173] == list(expected)[: 173]


# spot_r_distill-coco trains DINOv2 blocks 8–11 of its student: test_distill.py checks its freezing.
@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"spot_r_distill-coco"}))
def test_backbone_is_frozen_and_detach_flag_starts_on(name):
    model = smoothsa.build_model(name, backbone=True)
    discovery = getattr(model, "discov", model)
    assert not any(p.requires_grad for p in discovery.encode_backbone.parameters())
    if hasattr(discovery.initializ, "detach_flag"):
        assert bool(discovery.initializ.detach_flag)


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"demo"}))
def test_official_presets_keep_the_official_switches(name):
    preset = get_preset(name)
    assert preset.optim.preheat_detach == 0.1
    assert (preset.model.patch_position, preset.model.decoder_p, preset.model.decoder_pe_init) == (0.0, 0.5, "trunc_normal")


def test_unknown_preset_lists_known_names():
    with pytest.raises(KeyError, match="smoothsa_r-coco") as info:
        smoothsa.build_model("smoothsa_r-cocoa")
    assert "smoothsa_r-cocoa" in str(info.value)


def test_unknown_override_is_named():
    with pytest.raises(TypeError, match="slots"):
        smoothsa.build_model("smoothsa_r-coco", backbone=False, slots=3)


def test_overrides_change_the_model():
    model = smoothsa.build_model("smoothsa_r-coco", backbone=False, num_slots=5, trunc_bp=None, num_iter=2)
    assert model.initializ.num == 5 and model.aggregat.trunc_bp is None and model.aggregat.num_iter == 2


def test_decoder_and_patch_options_reach_the_modules_and_are_checked():
    model = smoothsa.build_model("demo", decoder_p=0.0, decoder_pe_init="sincos", patch_position=0.25)
    assert model.decode.p == 0.0 and model.encode_backbone.position_code is not None
    for name, override in [("spot_r-coco", dict(decoder_p=0.0)), ("spot_r-coco", dict(decoder_pe_init="sincos")),
                           ("smoothsa_r-coco", dict(patch_position=0.5))]:
        with pytest.raises(ValueError, match="only"):
            smoothsa.build_model(name, backbone=name == "smoothsa_r-coco", **override)


def test_command_line_overrides_are_typed():
    preset = apply_overrides(
        get_preset("smoothsa_r-coco"),
        ["optim.lr=1e-4", "model.num_slots=5", "model.trunc_bp=None", "optim.clip_norm=none", "optim.loss_weights.preheat=3"],
    )
    assert preset.optim.lr == 1e-4 and preset.model.num_slots == 5 and preset.model.trunc_bp is None
    assert preset.optim.clip_norm is None and preset.optim.loss_weights["preheat"] == 3.0
    assert get_preset("smoothsa_r-coco").optim.loss_weights["preheat"] == 100.0  # the registry is untouched
    for bad, message in [("optim.lr=fast", "expected float"), ("model.slots=3", "no field 'slots'"), ("lr=3", "start with")]:
        with pytest.raises(ValueError, match=message):
            apply_overrides(get_preset("smoothsa_r-coco"), [bad])


@pytest.mark.parametrize(
    "name,steps,batch,lr,clip,clip_type,weights",
    [
        ("smoothsa_r-coco", 100_000, 32, 2e-4, 1.0, "l2", {"recon": 1.0, "preheat": 100.0}),
        ("smoothsa_r-clevrtex", 50_000, 32, 2e-4, 1.0, "l2", {"recon": 1.0, "preheat": 100.0}),
        ("smoothsav_c-movi_c", 50_000, 8, 5e-5, 0.05, "l2", {"recon": 1.0, "ssc": 0.5, "preheat": 100.0}),
        ("spot_r-voc", 50_000, 32, 2e-4, 0.3, "inf", {"recon": 1.0}),
        ("smoothsa_r_recogn-coco", 10_000, 32, 1e-3, None, "l2", {"ce": 1.0, "l1": 1.0}),
        ("smoothsav_r_recogn-ytvis", 5_000, 8, 1e-3, None, "l2", {"ce": 1.0, "l1": 1.0}),
    ],
)
def test_training_hyperparameters_follow_the_official_configs(name, steps, batch, lr, clip, clip_type, weights):
    optim = get_preset(name).optim
    assert (optim.total_steps, optim.batch_size, optim.lr, optim.clip_norm) == (steps, batch, lr, clip)
    assert optim.loss_weights == weights
    if clip is not None:
        assert optim.clip_type == clip_type


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_round_trips_through_its_config(name):
    preset = get_preset(name)
    assert validate(preset) is preset
    assert preset_from_dict(json.loads(json.dumps(preset_to_dict(preset)))) == preset


def test_fields_with_fixed_choices_are_literal_types():
    literal = {f"{section.__name__}.{k}": typing.get_args(v) for section in (ModelConfig, DataConfig, OptimConfig)
               for k, v in typing.get_type_hints(section).items() if "Literal" in str(v)}
    assert literal["OptimConfig.clip_type"] == ("l2", "inf")
    assert literal["DataConfig.coco_mode"] == ("instance", "panoptic")
    assert set(literal) == {"ModelConfig.arch", "ModelConfig.initializer", "ModelConfig.trunc_bp", "ModelConfig.decoder",
                            "ModelConfig.backbone", "ModelConfig.decoder_pe_init", "DataConfig.dataset",
                            "DataConfig.coco_mode", "OptimConfig.clip_type"}
    assert set(typing.get_args(typing.get_type_hints(DataConfig)["dataset"])) == set(DATASETS)


@pytest.mark.parametrize("assignment,message", [
    ("optim.clip_type=l3", "--set optim.clip_type=l3: expected one of 'l2', 'inf'"),
    ("optim.clip_type=L2", "--set optim.clip_type=L2: expected one of 'l2', 'inf'"),
    ("model.trunc_bp=full", "--set model.trunc_bp=full: expected one of 'bi-level' or None"),
    ("model.decoder=ar8", "--set model.decoder=ar8: expected one of 'arrand', 'ar9'"),
    ("data.dataset=cocoa", "--set data.dataset=cocoa: expected one of 'clevrtex', 'coco', 'voc', 'movi_c'"),
    ("optim.batch_size=-4", "optim.batch_size must be at least 1, got -4"),
    ("optim.batch_size=0", "optim.batch_size must be at least 1, got 0"),
    ("optim.val_batch_size=0", "optim.val_batch_size must be at least 1, got 0"),
    ("optim.total_steps=0", "optim.total_steps must be at least 1, got 0"),
    ("optim.validations=0", "optim.validations must be at least 1, got 0"),
    ("optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
    ("optim.lr=-1e-4", "optim.lr must be a finite number > 0, got -0.0001"),
    ("optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
    ("optim.clip_norm=0", "optim.clip_norm must be a finite number > 0 or None"),
    ("optim.preheat_detach=1.5", r"optim.preheat_detach must lie in [0, 1], got 1.5"),
    ("optim.loss_weights.preheat=nan", "optim.loss_weights.preheat must be a finite number ≥ 0, got nan"),
    ("optim.seed=-1", "optim.seed must lie in [0, "),
    ("model.num_slots=0", "model.num_slots must be at least 1, got 0"),
    ("model.num_slots=none", "model.num_slots must be at least 1, got None"),
    ("model.num_iter=0", "model.num_iter must be at least 1, got 0"),
    ("model.decoder_p=2", "model.decoder_p must lie in [0, 1], got 2.0"),
    ("model.grid=0", "model.grid must be at least 1, got 0"),
    ("data.repeat_long=-1", "data.repeat_long must be at least 0, got -1"),
])
def test_bad_values_are_one_line_user_errors(assignment, message):
    before = get_preset("smoothsa_r-coco")
    with pytest.raises(UserError) as info:
        apply_overrides(before, [assignment])
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)
    assert before == get_preset("smoothsa_r-coco")


def test_box_conditioned_video_presets_keep_num_slots_none():
    preset = apply_overrides(get_preset("smoothsav_c-movi_c"), ["model.num_slots=none"])
    assert preset.model.num_slots is None and preset.model.initializer == "mlp_preheated"


def test_a_foreign_config_is_a_user_error():
    config = preset_to_dict(get_preset("demo"))
    config["optim"]["momentum"] = 0.9
    with pytest.raises(UserError, match="not a preset configuration"):
        preset_from_dict(config)
    config = preset_to_dict(get_preset("demo"))
    config["optim"]["clip_type"] = "l3"
    with pytest.raises(UserError, match="optim.clip_type must be one of 'l2', 'inf', got 'l3'"):
        preset_from_dict(config)

"""Loading official checkpoints: strict key/shape checks with errors that name the key."""
import pytest
import torch

import smoothsa
from smoothsa.checkpoint import read_checkpoint


def _features(b=2):
    return torch.randn(b, 384, 16, 16, generator=torch.Generator().manual_seed(1))


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("name", ["smoothsa_r-coco", "spot_r-coco"])
def test_round_trip_through_a_file_reproduces_outputs(tmp_path, name):
    source = _randomise(smoothsa.build_model(name, backbone=False)).eval()
    path = tmp_path / "42-0025.pth"
    torch.save(smoothsa.official_state_dict(source), path)
    target = smoothsa.load_official(smoothsa.build_model(name, backbone=False), path).eval()
    x, noise = _features(), torch.randn(2, source.initializ.num, 256)
    with torch.no_grad():
        a, b = source(x, init_noise=noise), target(x, init_noise=noise)
    assert torch.equal(a.slots, b.slots) and torch.equal(a.recon, b.recon)


def test_full_checkpoint_loads_without_its_backbone(tmp_path):
    full = _randomise(smoothsa.build_model("smoothsa_r-voc", backbone=True))
    state = smoothsa.official_state_dict(full)
    assert len(state) == 254
    model = smoothsa.load_official(smoothsa.build_model("smoothsa_r-voc", backbone=False), state)
    assert torch.equal(model.aggregat.proj_q.weight, full.aggregat.proj_q.weight)


def test_backbone_checkpoint_loads_into_backbone_model():
    full = _randomise(smoothsa.build_model("smoothsa_r-voc", backbone=True))
    model = smoothsa.load_official(smoothsa.build_model("smoothsa_r-voc", backbone=True), smoothsa.official_state_dict(full))
    assert torch.equal(model.encode_backbone[1].blocks[11].mlp.fc2.weight, full.encode_backbone[1].blocks[11].mlp.fc2.weight)


def test_checkpoint_without_backbone_is_missing_keys_for_a_backbone_model():
    state = smoothsa.official_state_dict(smoothsa.build_model("smoothsa_r-voc", backbone=False))
    with pytest.raises(KeyError, match=r"173 missing key\(s\): m.encode_backbone.1.cls_token"):
        smoothsa.load_official(smoothsa.build_model("smoothsa_r-voc", backbone=True), state)


def test_missing_unexpected_and_misshapen_keys_are_named():
    state = smoothsa.official_state_dict(smoothsa.build_model("smoothsa_r-coco", backbone=False))
    del state["m.aggregat.proj_q.weight"]
    state["m.aggregat.proj_z.weight"] = torch.zeros(1)
    state["m.initializ.mean"] = torch.zeros(1, 2, 256)
    model = smoothsa.build_model("smoothsa_r-coco", backbone=False)
    with pytest.raises(KeyError) as info:
        smoothsa.load_official(model, state)
    message = str(info.value)
    assert "m.aggregat.proj_q.weight" in message and "m.aggregat.proj_z.weight" in message
    assert "m.initializ.mean: checkpoint (1, 2, 256) vs model (1, 1, 256)" in message
    relaxed = smoothsa.load_official(model, state, strict=False)
    assert len(relaxed.load_report) == 3


def test_checkpoint_of_another_preset_names_the_mismatching_keys():
    spot = smoothsa.official_state_dict(smoothsa.build_model("spot_r-coco", backbone=False))
    with pytest.raises(KeyError, match="m.decode.bos"):
        smoothsa.load_official(smoothsa.build_model("smoothsa_r-coco", backbone=False), spot)


def test_video_checkpoint_into_image_model_names_transit_keys():
    video = smoothsa.official_state_dict(smoothsa.build_model("smoothsav_r-ytvis", backbone=False))
    with pytest.raises(KeyError, match="m.transit.te.weight"):
        smoothsa.load_official(smoothsa.build_model("smoothsa_r-coco", backbone=False), video)


def test_recognition_checkpoint_round_trip():
    source = _randomise(smoothsa.build_model("smoothsa_r_recogn-coco", backbone=False))
    state = smoothsa.official_state_dict(source)
    assert list(state)[-1] == "m.recogn.3.bias" and state["m.recogn.3.bias"].shape == (95,)
    model = smoothsa.load_official(smoothsa.build_model("smoothsa_r_recogn-coco", backbone=False), state)
    assert torch.equal(model.recogn[3].weight, source.recogn[3].weight)


def test_keys_without_prefix_load_too():
    source = _randomise(smoothsa.build_model("smoothsa_r-coco", backbone=False))
    state = source.state_dict()
    assert not any(k.startswith("m.") for k in state)
    model = smoothsa.load_official(smoothsa.build_model("smoothsa_r-coco", backbone=False), state)
    assert model.load_report == []
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_loading_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"m.x": torch.zeros(1), "hook": print}, path)  # a function is not a tensor: refused by weights_only
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        read_checkpoint(path)


def test_missing_file_and_non_state_dict_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(TypeError, match="not a state_dict"):
        read_checkpoint([1, 2])

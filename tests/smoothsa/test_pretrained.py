"""Pretrained DINOv2 loading: both published layouts, SmoothSA checkpoints, the cache, the offline error.

Checkpoints are small random ones made here (a narrow ViT with the real 37×37 position table); no network.
"""
import hashlib
import json
import struct
import urllib.error

import pytest
import torch
import torch.nn.functional as F

from smoothsa import load_dinov2
from smoothsa.backbone import DINOv2ViT
from smoothsa.build import build_model
from smoothsa.checkpoint import official_state_dict
from smoothsa.pretrained import (
    DINOV2_FILE,
    DINOV2_SHA256,
    DINOV2_URL,
    RANDOM_BANNER,
    TIMM_REPO,
    BackboneWeightsError,
    WeightsUnavailableError,
    resample_position_table,
    resolve_backbone_weights,
)
from smoothsa.presets import get_preset

DIM, DEPTH, HEADS = 24, 2, 2
PRETRAINED_GRID = 37


def tiny_backbone() -> DINOv2ViT:
    return DINOv2ViT(img_size=224, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)


def block_weights(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors for every key the blocks and the patch embedding have, plus the final norm."""
    shapes = {"patch_embed.proj.weight": (DIM, 3, 14, 14), "patch_embed.proj.bias": (DIM,)}
    for i in range(DEPTH):
        shapes |= {
            f"blocks.{i}.norm1.weight": (DIM,), f"blocks.{i}.norm1.bias": (DIM,),
            f"blocks.{i}.attn.qkv.weight": (3 * DIM, DIM), f"blocks.{i}.attn.qkv.bias": (3 * DIM,),
            f"blocks.{i}.attn.proj.weight": (DIM, DIM), f"blocks.{i}.attn.proj.bias": (DIM,),
            f"blocks.{i}.ls1.gamma": (DIM,), f"blocks.{i}.norm2.weight": (DIM,), f"blocks.{i}.norm2.bias": (DIM,),
            f"blocks.{i}.mlp.fc1.weight": (4 * DIM, DIM), f"blocks.{i}.mlp.fc1.bias": (4 * DIM,),
            f"blocks.{i}.mlp.fc2.weight": (DIM, 4 * DIM), f"blocks.{i}.mlp.fc2.bias": (DIM,),
            f"blocks.{i}.ls2.gamma": (DIM,),
        }
    shapes |= {"norm.weight": (DIM,), "norm.bias": (DIM,)}
    return {k: torch.randn(s, generator=generator) for k, s in shapes.items()}


def facebookresearch_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return block_weights(g) | {
        "cls_token": torch.randn(1, 1, DIM, generator=g),
        "register_tokens": torch.randn(1, 4, DIM, generator=g),
        "mask_token": torch.randn(1, DIM, generator=g),
        "pos_embed": torch.randn(1, 1 + PRETRAINED_GRID**2, DIM, generator=g),
    }


def timm_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return block_weights(g) | {
        "cls_token": torch.randn(1, 1, DIM, generator=g),
        "reg_token": torch.randn(1, 4, DIM, generator=g),
        "pos_embed": torch.randn(1, PRETRAINED_GRID**2, DIM, generator=g),
    }


def write_safetensors(path, tensors: dict[str, torch.Tensor]) -> None:
    """The file format, written independently of the reader under test."""
    header, chunks, offset = {}, [], 0
    for name, tensor in tensors.items():
        data = tensor.contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def expected_timm_conversion(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What timm's checkpoint filter produces for a 224 input, written out step by step."""
    out = {k: v for k, v in weights.items() if not k.startswith("norm.") and k != "mask_token"}
    if "register_tokens" in out:
        table = out.pop("pos_embed")
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + table[:, :1]
        out["pos_embed"] = table[:, 1:]
    table = out["pos_embed"].reshape(1, PRETRAINED_GRID, PRETRAINED_GRID, DIM).permute(0, 3, 1, 2)
    table = F.interpolate(table.float(), size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    out["pos_embed"] = table.permute(0, 2, 3, 1).reshape(1, 256, DIM)
    return out


def assert_loaded(backbone: DINOv2ViT, expected: dict[str, torch.Tensor]) -> None:
    state = backbone.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_facebookresearch_layout(tmp_path):
    weights = facebookresearch_weights()
    path = tmp_path / DINOV2_FILE
    torch.save(weights, path)
    backbone = load_dinov2(tiny_backbone(), path)
    assert_loaded(backbone, expected_timm_conversion(weights))
    assert backbone.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_timm_layout(tmp_path, name):
    weights = timm_weights()
    path = tmp_path / name
    if name.endswith(".safetensors"):
        write_safetensors(path, weights)
    else:
        torch.save(weights, path)
    assert_loaded(load_dinov2(tiny_backbone(), path), expected_timm_conversion(weights))


def test_features_follow_the_weights(tmp_path):
    """Loaded weights change what the backbone computes: the forward pass uses them all."""
    weights = timm_weights()
    path = tmp_path / "model.safetensors"
    write_safetensors(path, weights)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    random_features = tiny_backbone()(image)
    loaded = load_dinov2(tiny_backbone(), path)
    reference = tiny_backbone()
    reference.load_state_dict(expected_timm_conversion(weights))
    assert torch.equal(loaded(image), reference(image))
    assert not torch.allclose(loaded(image), random_features)


def test_position_table_resampling_by_hand():
    """4×4 → 2×2: antialiased bicubic (a = −0.5, support widened ×2) has the taps 111, 111, 29, −9 (/242)."""
    columns = torch.tensor([1.0, 2.0, 4.0, 8.0])
    rows = torch.tensor([0.0, 1.0, 3.0, -2.0])
    grid = rows[:, None] * 10 + columns[None, :]  # (4, 4), separable so both axes are checked
    table = torch.stack([grid, -grid], -1).reshape(1, 16, 2)  # two channels
    taps = torch.tensor([[111.0, 111.0, 29.0, -9.0], [-9.0, 29.0, 111.0, 111.0]], dtype=torch.float64) / 242
    expected = taps @ grid.double() @ taps.T  # (2, 2)
    out = resample_position_table(table, 2)
    assert out.shape == (1, 4, 2)
    torch.testing.assert_close(out[0, :, 0].double(), expected.reshape(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[0, :, 1].double(), -expected.reshape(-1), rtol=0, atol=1e-5)


def test_position_table_keeps_dtype_and_computes_in_float32():
    table = torch.randn(1, 37 * 37, 8).half()
    out = resample_position_table(table, 16)
    assert out.dtype == torch.float16
    reference = F.interpolate(table.float().reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(16, 16),
                              mode="bicubic", antialias=True, align_corners=False)
    assert torch.equal(out, reference.permute(0, 2, 3, 1).reshape(1, 256, 8).half())


def test_smoothsa_checkpoint_into_a_full_model(tmp_path):
    source = build_model("smoothsa_r-coco")
    with torch.no_grad():
        for parameter in source.encode_backbone[1].parameters():
            parameter.normal_()
    path = tmp_path / "ckpt.pth"
    torch.save(official_state_dict(source), path)
    target = build_model("smoothsa_r-coco")
    assert load_dinov2(target, path) is target
    for key, value in source.encode_backbone.state_dict().items():
        assert torch.equal(target.encode_backbone.state_dict()[key], value), key


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda w: w.update(extra=torch.zeros(1)), "'extra'"),
        (lambda w: w.pop("blocks.1.ls2.gamma"), "'blocks.1.ls2.gamma'"),
        (lambda w: w.update({"blocks.0.attn.qkv.bias": torch.zeros(5)}), "'blocks.0.attn.qkv.bias'"),
        (lambda w: w.update(pos_embed=torch.zeros(1, 1 + 37 * 36, DIM)), "'pos_embed'"),
    ],
)
def test_mismatches_name_the_key_and_the_file(tmp_path, change, named):
    weights = facebookresearch_weights()
    change(weights)
    path = tmp_path / "odd.pth"
    torch.save(weights, path)
    with pytest.raises(BackboneWeightsError) as error:
        load_dinov2(tiny_backbone(), path)
    assert named in str(error.value) and str(path) in str(error.value)


def test_a_model_without_dinov2_is_refused(tmp_path):
    with pytest.raises(BackboneWeightsError, match="no DINOv2 backbone"):
        load_dinov2(build_model("demo"), tmp_path / "x.pth")


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches, and a downloader that fails the test if it is called."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    calls = []

    def refuse(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path, calls


def test_the_torch_hub_cache_comes_first(caches):
    root, calls = caches
    weights = facebookresearch_weights()
    path = root / "torch" / "hub" / "checkpoints" / DINOV2_FILE
    path.parent.mkdir(parents=True)
    torch.save(weights, path)
    write_safetensors(_hf_snapshot(root) / "model.safetensors", timm_weights())
    backbone = load_dinov2(tiny_backbone())
    assert_loaded(backbone, expected_timm_conversion(weights))
    assert backbone.weights_file == str(path) and not calls


def _hf_snapshot(root):
    folder = root / "hf" / ("models--" + TIMM_REPO.replace("/", "--")) / "snapshots" / "0123abcd"
    folder.mkdir(parents=True)
    return folder


def test_the_hugging_face_cache_is_used_next(caches):
    root, calls = caches
    weights = timm_weights()
    write_safetensors(_hf_snapshot(root) / "model.safetensors", weights)
    assert_loaded(load_dinov2(tiny_backbone()), expected_timm_conversion(weights))
    assert not calls


def test_download_is_hash_checked_into_the_hub_cache(caches, monkeypatch):
    root, _ = caches
    weights = facebookresearch_weights()
    seen = {}

    def download(url, dst, hash_prefix=None, progress=True):
        seen.update(url=url, dst=dst, hash_prefix=hash_prefix)
        torch.save(weights, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    assert_loaded(load_dinov2(tiny_backbone()), expected_timm_conversion(weights))
    assert seen == dict(url=DINOV2_URL, dst=str(root / "torch" / "hub" / "checkpoints" / DINOV2_FILE),
                        hash_prefix=DINOV2_SHA256)


def test_offline_without_a_cache_is_one_clear_error(caches):
    root, calls = caches
    backbone = tiny_backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(WeightsUnavailableError) as error:
        load_dinov2(backbone)
    message = str(error.value)
    assert DINOV2_URL in message and str(root / "torch" / "hub" / "checkpoints") in message
    assert "--backbone-weights" in message and len(calls) == 1
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    with pytest.raises(WeightsUnavailableError):
        resolve_backbone_weights(backbone, get_preset("smoothsa_r-coco"), "auto")


def test_resolve_backbone_weights(tmp_path):
    path = tmp_path / "weights.safetensors"
    write_safetensors(path, timm_weights())
    preset = get_preset("smoothsa_r-coco")
    banner = resolve_backbone_weights(tiny_backbone(), preset, str(path))
    assert banner == f"backbone weights: weights.safetensors (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:12]})"
    backbone = tiny_backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    assert resolve_backbone_weights(backbone, preset, "random") == RANDOM_BANNER
    assert "RANDOM BACKBONE" in RANDOM_BANNER
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    demo = get_preset("demo")
    assert "needs no weights" in resolve_backbone_weights(build_model("demo"), demo, "auto")
    with pytest.raises(BackboneWeightsError, match="no pretrained weights"):
        resolve_backbone_weights(build_model("demo"), demo, str(path))

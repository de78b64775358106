"""The DINOv2 ViT against an independent float64 formulation with explicit softmax attention."""
import pytest
import torch
import torch.nn.functional as F

from smoothsa.backbone import DINOv2ViT, dinov2_backbone


def _reference_vit(vit: DINOv2ViT, image: torch.Tensor) -> torch.Tensor:
    p = dict(vit.named_parameters())
    x = F.conv2d(image, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=14)
    b, d, gh, gw = x.shape
    x = x.reshape(b, d, gh * gw).permute(0, 2, 1) + p["pos_embed"]
    x = torch.cat([p["cls_token"].expand(b, 1, d), p["reg_token"].expand(b, 4, d), x], 1)
    for i in range(len(vit.blocks)):
        q = lambda n: p[f"blocks.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(x, (d,), q("norm1.weight"), q("norm1.bias"), eps=1e-6)
        qkv = h @ q("attn.qkv.weight").T + q("attn.qkv.bias")
        heads = 6
        qh, kh, vh = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in qkv.split(d, -1))
        att = torch.softmax(qh @ kh.transpose(-1, -2) / (d // heads) ** 0.5, -1) @ vh
        att = att.transpose(1, 2).reshape(b, -1, d) @ q("attn.proj.weight").T + q("attn.proj.bias")
        x = x + q("ls1.gamma") * att
        h = F.layer_norm(x, (d,), q("norm2.weight"), q("norm2.bias"), eps=1e-6)
        h = F.gelu(h @ q("mlp.fc1.weight").T + q("mlp.fc1.bias")) @ q("mlp.fc2.weight").T + q("mlp.fc2.bias")
        x = x + q("ls2.gamma") * h
    return x[:, 5:].transpose(1, 2).reshape(b, d, gh, gw)


def test_vit_matches_reference():
    torch.manual_seed(0)
    vit = DINOv2ViT(img_size=56, depth=2).double()  # a 4×4 grid keeps the test fast; same code path
    with torch.no_grad():
        for prm in vit.parameters():
            prm.copy_(torch.randn_like(prm) * 0.2)
    image = torch.randn(2, 3, 56, 56, dtype=torch.double)
    torch.testing.assert_close(vit(image), _reference_vit(vit, image), atol=1e-10, rtol=1e-10)


def test_backbone_resizes_256_to_224_bicubic_and_returns_16x16():
    backbone = dinov2_backbone().eval()
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        feature = backbone(image)
        expected = backbone[1](F.interpolate(image, size=(224, 224), mode="bicubic", align_corners=False))
    assert feature.shape == (1, 384, 16, 16)
    torch.testing.assert_close(feature, expected)


def test_vit_rejects_wrong_image_size():
    with pytest.raises(ValueError, match=r"\(B, 3, 224, 224\)"):
        DINOv2ViT()(torch.randn(1, 3, 256, 256))


def test_patch_features_are_fixed_random_patch_projections():
    from smoothsa.backbone import PatchFeatures

    a, b = PatchFeatures(64, 8, 32), PatchFeatures(64, 8, 32)
    assert torch.equal(a.proj.weight, b.proj.weight) and not any(p.requires_grad for p in a.parameters())
    image = torch.randn(1, 3, 64, 64)
    image[..., 8:16, 8:16] = image[..., :8, :8]  # two identical patches at different places
    features = a(image)
    torch.testing.assert_close(features[0, :, 0, 0], features[0, :, 1, 1])
    expected = torch.einsum("dchw,chw->d", a.proj.weight, image[0, :, 16:24, 40:48])  # patch (2, 5)
    torch.testing.assert_close(features[0, :, 2, 5], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        a(torch.zeros(1, 3, 32, 32))


def test_sincos_position_code():
    import math

    from smoothsa.backbone import sincos_position_code

    code = sincos_position_code(16, 64).double()
    assert code.shape == (256, 64)
    row, col, k = 5, 11, 3  # token (5, 11) = index 5·16 + 11; frequency k of 16, wavelength 2·32^(k/15)
    angle = 2 * math.pi / (2 * 32 ** (k / 15))
    expected = [math.sin(row * angle), math.cos(row * angle), math.sin(col * angle), math.cos(col * angle)]
    torch.testing.assert_close(code[row * 16 + col, k::16], torch.tensor(expected, dtype=torch.double), atol=1e-6, rtol=0)
    distance = torch.cdist(code, code)
    assert distance[~torch.eye(256, dtype=torch.bool)].min() > 0.1  # every token distinct
    assert distance[0, 1] < distance[0, 8] < distance[0, 255]  # nearer tokens, closer codes
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_position_code(4, 30)


def test_patch_features_position_code_is_added_and_not_saved():
    from smoothsa.backbone import PatchFeatures, sincos_position_code

    plain, placed = PatchFeatures(64, 8, 32), PatchFeatures(64, 8, 32, position=0.5)
    image = torch.randn(2, 3, 64, 64)
    code = sincos_position_code(8, 32).T.reshape(1, 32, 8, 8)
    torch.testing.assert_close(placed(image), plain(image) + 0.5 * code)
    assert placed.state_dict().keys() == plain.state_dict().keys() == {"proj.weight"}

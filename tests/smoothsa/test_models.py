"""Whole models: input validation, output shapes, and which parameters each loss reaches (docs/official.md §2.4, §2.10)."""
import pytest
import torch

import smoothsa
from smoothsa.losses import preheat_loss, reconstruction_loss


def _features(b=2, t=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 384, 16, 16) if t is None else (b, t, 384, 16, 16)
    return torch.randn(shape, generator=g)


def _boxes(b=2, t=3, s=4):
    lt = torch.rand(b, t, s, 2) * 0.6
    return torch.cat([lt, lt + 0.2], -1)


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_image_model_output_shapes_with_backbone():
    model = smoothsa.build_model("smoothsa_r-voc").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 256))
    assert out.feature.shape == (1, 384, 16, 16) and out.qinit.shape == (1, 6, 256) and out.slots.shape == (1, 6, 256)
    assert out.attn_enc.shape == out.attn_dec.shape == (1, 6, 16, 16) and out.recon.shape == (1, 384, 16, 16)
    torch.testing.assert_close(out.attn_enc.sum(1), torch.ones(1, 16, 16))  # softmax over slots


@pytest.mark.parametrize("name,s", [("smoothsav_c-movi_c", 4), ("smoothsav_r-ytvis", 7)])
def test_video_model_output_shapes(name, s):
    model = smoothsa.build_model(name, backbone=False).eval()
    condit = _boxes(s=s) if name.endswith("movi_c") else None
    with torch.no_grad():
        out = model(_features(t=3), condit=condit)
    assert out.slots.shape == (2, 3, s, 256) and out.qinit.shape == (2, s, 256)
    assert out.attn_enc.shape == out.attn_dec.shape == (2, 3, s, 16, 16) and out.recon.shape == (2, 3, 384, 16, 16)


def test_spot_output_and_untruncated_gradient():
    model = smoothsa.build_model("spot_r-coco", backbone=False).train()
    out = model(_features())
    assert out.slots.shape == (2, 7, 256) and out.qinit.shape == (2, 7, 256)
    reconstruction_loss(out.recon, out.feature).backward()
    grads = _grads(model)
    assert "initializ.mean" in grads and "initializ.logstd" in grads  # SPOT's query is not detached


def test_init_noise_makes_eval_reproducible():
    model = smoothsa.build_model("smoothsa_r-coco", backbone=False).eval()
    x, noise = _features(), torch.randn(2, 7, 256)
    with torch.no_grad():
        model.initializ.logstd.fill_(-1.0)
        a, b, c = model(x, init_noise=noise), model(x, init_noise=noise), model(x)
    assert torch.equal(a.slots, b.slots) and not torch.equal(a.slots, c.slots)


def test_image_training_gradient_paths():
    model = smoothsa.build_model("smoothsa_r-coco", backbone=False).train()
    model.initializ.detach_flag.fill_(False)
    out = model(_features())
    reconstruction_loss(out.recon, out.feature).backward()
    grads = _grads(model)
    # The query is detached from the initializer, except its training noise ε2·exp(logstd2).
    assert "initializ.logstd2" in grads
    assert not any(n.startswith("initializ.") and n != "initializ.logstd2" for n in grads)
    assert {"aggregat.proj_q.weight", "encode_project.1.weight", "decode.mask_token"} <= set(grads)
    model.zero_grad()
    out = model(_features())
    preheat_loss(out.qinit, out.slots).backward()
    grads = _grads(model)
    assert {"initializ.mean", "initializ.logstd", "initializ.qinit.linear1.weight", "encode_project.1.weight"} <= set(grads)
    assert not any(n.startswith(("aggregat.", "decode.")) for n in grads)  # the slots are the target


def test_detach_flag_keeps_preheat_loss_out_of_the_projection():
    model = smoothsa.build_model("smoothsa_r-coco", backbone=False).train()
    assert bool(model.initializ.detach_flag)
    out = model(_features())
    preheat_loss(out.qinit, out.slots).backward()
    grads = _grads(model)
    assert "initializ.qproj_kv.weight" in grads and not any(n.startswith("encode_project.") for n in grads)


def test_video_training_gradients_reach_the_transit_and_every_frame():
    model = smoothsa.build_model("smoothsav_c-movi_c", backbone=False).train()
    x = _features(t=2).requires_grad_()
    out = model(x, condit=_boxes(t=2))
    reconstruction_loss(out.recon, out.feature).backward()
    grads = _grads(model)
    assert {"transit.proji.weight", "transit.transit.linear1.weight", "initializ.logstd2"} <= set(grads)
    assert x.grad is None or x.grad.abs().sum() == 0  # features are frozen inputs


def test_bad_inputs_are_named():
    image = smoothsa.build_model("smoothsa_r-coco", backbone=False)
    with pytest.raises(ValueError, match=r"\(B, 384, 16, 16\), got \(2, 3, 256, 256\)"):
        image(torch.randn(2, 3, 256, 256))
    with pytest.raises(ValueError, match=r"\(B, 384, 16, 16\), got \(2, 384, 14, 14\)"):
        image(torch.randn(2, 384, 14, 14))
    with pytest.raises(ValueError, match="takes no condit"):
        image(_features(), condit=torch.zeros(2, 7, 4))
    with pytest.raises(ValueError, match=r"init_noise must have shape \(2, 7, 256\)"):
        image(_features(), init_noise=torch.zeros(2, 6, 256))
    with pytest.raises(ValueError, match=r"images of shape \(B, 3, 256, 256\)"):
        smoothsa.build_model("smoothsa_r-coco")(torch.randn(1, 3, 224, 224))
    video = smoothsa.build_model("smoothsav_c-movi_c", backbone=False)
    with pytest.raises(ValueError, match="first-frame boxes, got None"):
        video(_features(t=3))
    with pytest.raises(ValueError, match=r"condit must be \(B=2, T=3, S, 4\)"):
        video(_features(t=3), condit=torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"init_noise must have shape \(2, 4, 256\)"):
        video(_features(t=3), condit=_boxes(s=4), init_noise=torch.zeros(2, 5, 256))
    with pytest.raises(ValueError, match=r"\(B, T, 384, 16, 16\)"):
        video(_features())
    with pytest.raises(ValueError, match=r"query must be \(B, S, 256\)"):
        smoothsa.SlotAttention()(torch.randn(2, 10, 384), torch.randn(2, 7, 128))
    with pytest.raises(ValueError, match=r"input must be \(B, N, 384\)"):
        smoothsa.SlotAttention()(torch.randn(2, 10, 256), torch.randn(2, 7, 256))


def test_official_reset_zeroes_the_right_biases():
    image = smoothsa.build_model("smoothsa_r-coco", backbone=False)
    assert image.encode_project[1].bias.abs().sum() == 0 and image.aggregat.rnn.bias_ih.abs().sum() == 0
    assert image.initializ.qproj_kv.bias.abs().sum() > 0  # the initializer keeps PyTorch's default init
    video = smoothsa.build_model("smoothsav_r-ytvis", backbone=False)
    assert video.transit.proji.bias.abs().sum() == 0 and video.aggregat.ffn[0].bias.abs().sum() == 0

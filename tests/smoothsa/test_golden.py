"""The official modules' outputs and gradients (../shared/golden), reproduced in float64 and float32."""
import pytest
import torch

import smoothsa

# Tolerances of shared/golden/README.md: float64 atol = rtol = 1e-9; float32 atol 5e-5, rtol 1e-4, and
# atol 5e-6 on attention maps.
TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-9, attn_atol=1e-9),
    torch.float32: dict(atol=5e-5, rtol=1e-4, attn_atol=5e-6),
}
FIELDS = [("qinit", "qinit"), ("slots", "slotz"), ("attn_enc", "attenta"), ("recon", "recon"), ("attn_dec", "attentd")]
DTYPES = [torch.float64, torch.float32]


def assert_close(actual, expected, dtype, attention=False, name=""):
    tol = TOL[dtype]
    atol = tol["attn_atol"] if attention else tol["atol"]
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")


def _model(preset, state_dict, dtype):
    model = smoothsa.build_model(preset, backbone=False, fused=False)
    smoothsa.load_official(model, state_dict)
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["clean", "noisy"])
def test_image_model(golden, dtype, variant):
    g = golden("image")
    model = _model("smoothsa_r-coco", g["state_dict"], dtype)
    noise = torch.zeros(2, 7, 256)
    prefix = ""
    if variant == "noisy":
        # Same model, except the initializer's logstd and its eval-mode ε draw (README "noisy variant").
        model.initializ.logstd.data.copy_(g["noisy_logstd"])
        noise = g["noisy_randn"]
        prefix = "noisy_"
    with torch.no_grad():
        out = model(g["feature"].to(dtype), init_noise=noise.to(dtype))
    for ours, theirs in FIELDS:
        assert_close(getattr(out, ours), g[prefix + theirs], dtype, attention=ours.startswith("attn"), name=ours)
    if variant == "noisy":  # distinct slots: every slot wins some tokens, so segmentation is meaningful
        assert out.attn_enc.argmax(1).unique().numel() == 7


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_video_model(golden, dtype):
    g = golden("video")
    model = _model("smoothsav_c-movi_c", g["state_dict"], dtype)
    with torch.no_grad():
        out = model(g["feature"].to(dtype), condit=g["condit"].to(dtype), init_noise=torch.zeros(2, 11, 256, dtype=dtype))
    for ours, theirs in FIELDS:
        assert_close(getattr(out, ours), g[theirs], dtype, attention=ours.startswith("attn"), name=ours)


@pytest.mark.parametrize("name", ["image", "video"])
def test_state_dict_keys_and_order_match_official(golden, name):
    g = golden(name)
    preset = {"image": "smoothsa_r-coco", "video": "smoothsav_c-movi_c"}[name]
    ours = smoothsa.official_state_dict(smoothsa.build_model(preset, backbone=False))
    # Order matters: the official partial loading pairs keys by position.
    assert list(ours) == list(g["state_dict"])
    assert all(ours[k].shape == v.shape and ours[k].dtype == v.dtype for k, v in g["state_dict"].items())


SA_CASES = [
    ("grads", "bi-level", None, ""),
    ("grads_trunc_none", None, None, ""),
    ("grads_iter1", "bi-level", 1, "_iter1"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grads_key,trunc,num_iter,suffix", SA_CASES, ids=[c[0] for c in SA_CASES])
def test_slot_attention_outputs_and_all_gradients(golden, dtype, grads_key, trunc, num_iter, suffix):
    g = golden("sa")
    sa = smoothsa.SlotAttention(trunc_bp=trunc, fused=False)
    sa.load_state_dict(g["state_dict"])
    sa = sa.to(dtype).train()
    x = g["input"].to(dtype, copy=True).requires_grad_()
    q = g["query"].to(dtype, copy=True).requires_grad_()
    slots, attn = sa(x, q, num_iter=num_iter)
    (slots * g["R"].to(dtype)).sum().backward()
    assert_close(slots, g["slots" + suffix], dtype, name="slots")
    assert_close(attn, g["attent" + suffix], dtype, attention=True, name="attn")
    expected = g[grads_key]
    grads = {"input": x.grad, "query": q.grad} | {f"param.{n}": p.grad for n, p in sa.named_parameters()}
    assert set(grads) == set(expected) and len(grads) == 19
    for name, grad in grads.items():
        ref = expected[name]
        if name == "param.norm1q.bias":  # analytically zero: compare absolutely
            assert grad.abs().max() < (1e-12 if dtype == torch.float64 else 1e-5), name
            continue
        # Gradients are sums over many terms; scale the absolute tolerance with the gradient's magnitude.
        atol = TOL[dtype]["atol"] * max(1.0, ref.abs().max().item())
        torch.testing.assert_close(grad.double(), ref, atol=atol, rtol=TOL[dtype]["rtol"], msg=lambda m: f"{name}: {m}")

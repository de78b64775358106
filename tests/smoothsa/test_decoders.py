"""Decoder behaviour that the golden vectors (eval only) do not cover: training masks and SPOT's orders."""
import pytest
import torch

from smoothsa.decoders import SHORT_KEEP, AR9TransformerDecoder, ARRandTransformerDecoder, spot_orders


def _decoder(cls, **kw):
    torch.manual_seed(0)
    decoder = cls(**kw).double()
    with torch.no_grad():
        for p in decoder.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
    return decoder


def _inputs(b=2, n=256, s=5):
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, n, 384, generator=g, dtype=torch.double), torch.randn(b, s, 256, generator=g, dtype=torch.double)


@pytest.mark.parametrize("p,counts", [(0.0, {SHORT_KEEP}), (1.0, None)])
def test_visible_counts(p, counts):
    decoder = ARRandTransformerDecoder(p=p)
    torch.manual_seed(0)
    seen = decoder.visible_mask(4000, 256, torch.device("cpu")).sum(1)
    if counts is not None:
        assert set(seen.tolist()) == counts
    else:  # uniform in {0..N−2}
        assert seen.min() >= 0 and seen.max() <= 254 and len(set(seen.tolist())) > 200
        assert abs(seen.double().mean().item() - 127) < 5


def test_visible_positions_are_uniform():
    torch.manual_seed(0)
    mask = ARRandTransformerDecoder(p=0.0).visible_mask(4000, 256, torch.device("cpu"))
    frequency = mask.double().mean(0)  # each position visible with probability 24/256
    assert (frequency - SHORT_KEEP / 256).abs().max() < 0.03


def test_training_hides_masked_tokens(monkeypatch):
    decoder = _decoder(ARRandTransformerDecoder).train()
    tokens, slots = _inputs()
    visible = torch.rand(2, 256, generator=torch.Generator().manual_seed(5)) < 0.3
    monkeypatch.setattr(decoder, "visible_mask", lambda b, n, device: visible)
    recon, attn = decoder(tokens, slots)
    changed = tokens.clone()
    changed[~visible] += 10.0  # what the decoder must not see
    recon2, attn2 = decoder(changed, slots)
    torch.testing.assert_close(recon, recon2, atol=0, rtol=0)
    changed = tokens.clone()
    changed[visible] += 10.0
    assert not torch.allclose(decoder(changed, slots)[0], recon)
    torch.testing.assert_close(attn.sum(1), torch.ones(2, 256, dtype=torch.double))  # softmax over slots


def test_all_visible_training_equals_eval(monkeypatch):
    decoder = _decoder(ARRandTransformerDecoder)
    tokens, slots = _inputs()
    expected = decoder.eval()(tokens, slots)
    monkeypatch.setattr(decoder, "visible_mask", lambda b, n, device: torch.ones(b, n, dtype=torch.bool))
    got = decoder.train()(tokens, slots)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


@pytest.mark.parametrize("order", range(9))
def test_ar9_is_causal_along_each_order(order):
    decoder = _decoder(AR9TransformerDecoder, resolut=(4, 4)).eval()
    tokens, slots = _inputs(n=16)
    recon, attn = decoder(tokens, slots, order=order)
    perm = spot_orders(4, 4)[order]
    k = 6
    changed = tokens.clone()
    changed[:, perm[k]] += 5.0  # token k of the order is an input to positions k+1.. only
    recon2, _ = decoder(changed, slots, order=order)
    torch.testing.assert_close(recon2[:, perm[: k + 1]], recon[:, perm[: k + 1]], atol=0, rtol=0)
    assert not torch.allclose(recon2[:, perm[k + 1]], recon[:, perm[k + 1]])
    last = tokens.clone()
    last[:, perm[-1]] += 5.0  # the last token of the order is never an input
    torch.testing.assert_close(decoder(last, slots, order=order)[0], recon, atol=0, rtol=0)
    assert attn.shape == (2, 5, 16)


def test_ar9_eval_uses_raster_order_and_training_varies():
    decoder = _decoder(AR9TransformerDecoder, resolut=(4, 4))
    tokens, slots = _inputs(n=16)
    torch.testing.assert_close(decoder.eval()(tokens, slots)[0], decoder(tokens, slots, order=0)[0])
    decoder.train()
    torch.manual_seed(0)
    outputs = {round(decoder(tokens, slots)[0].sum().item(), 6) for _ in range(150)}
    assert len(outputs) == 9


def test_decoders_reject_bad_shapes():
    decoder = ARRandTransformerDecoder()
    with pytest.raises(ValueError, match=r"tokens must be \(B, N, 384\)"):
        decoder(torch.randn(2, 256, 256), torch.randn(2, 7, 256))
    with pytest.raises(ValueError, match=r"slots must be \(B=2, S, 256\)"):
        decoder(torch.randn(2, 256, 384), torch.randn(3, 7, 256))


def test_sincos_table_start_and_bad_arguments():
    from smoothsa.backbone import sincos_position_code

    decoder = ARRandTransformerDecoder(resolut=64, embed_dim=32, slot_dim=16, num_layers=1, ffn_dim=64, pe_init="sincos")
    torch.testing.assert_close(decoder.posit_embed._pe.detach()[0], sincos_position_code(8, 32))
    assert decoder.posit_embed._pe.requires_grad  # a start, still learnt
    with pytest.raises(ValueError, match="square token count"):
        ARRandTransformerDecoder(resolut=60, embed_dim=32, slot_dim=16, pe_init="sincos")
    with pytest.raises(ValueError, match="unknown init 'zeros'"):
        ARRandTransformerDecoder(pe_init="zeros")
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\]"):
        ARRandTransformerDecoder(p=1.5)


def test_ar9_training_order_is_a_device_draw_of_the_same_rng():
    """The training order is drawn as a tensor (no host sync) from the same generator state as a Python int
    `torch.randint(0, 9, ())` would be, and a tensor order selects exactly what the int does."""
    decoder = _decoder(AR9TransformerDecoder, resolut=(4, 4))
    tokens, slots = _inputs(n=16)
    for seed in range(4):
        torch.manual_seed(seed)
        order = int(torch.randint(0, 9, ()).item())
        torch.manual_seed(seed)
        drawn = decoder.train()(tokens, slots)
        given = decoder(tokens, slots, order=order)
        as_tensor = decoder(tokens, slots, order=torch.tensor(order))
        for out in (given, as_tensor):
            torch.testing.assert_close(drawn[0], out[0], atol=0, rtol=0)
            torch.testing.assert_close(drawn[1], out[1], atol=0, rtol=0)

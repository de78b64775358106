"""Our attention modules against PyTorch's: same parameters, same numbers, attention map computed beside."""
import pytest
import torch
import torch.nn as nn

from smoothsa.attention import MultiheadAttention, TransformerDecoderLayer


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if p.dim() > 1 else 1.0) + (1.0 if p.dim() == 1 else 0))
    return module


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_attention_matches_torch(bias, causal):
    ref = _randomise(nn.MultiheadAttention(32, 4, bias=bias, batch_first=True).double())
    ours = MultiheadAttention(32, 4, bias=bias).double()
    ours.load_state_dict(ref.state_dict())
    q = torch.randn(3, 9, 32, dtype=torch.double)
    kv = q if causal else torch.randn(3, 5, 32, dtype=torch.double)
    mask = torch.ones(9, 9, dtype=torch.bool).triu(1) if causal else None
    expected, weights = ref(q, kv, kv, attn_mask=mask, need_weights=True, average_attn_weights=True)
    out, ours_weights = ours(q, kv, kv, causal=causal, need_weights=True)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours_weights, weights, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("norm_first", [True, False])
def test_decoder_layer_matches_torch(norm_first):
    ref = nn.TransformerDecoderLayer(32, 4, 64, 0.0, "gelu", batch_first=True, norm_first=norm_first, bias=False)
    ref = _randomise(ref.double()).eval()
    ours = TransformerDecoderLayer(32, 4, 64, 0.0, norm_first, False).double().eval()
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x, memory = torch.randn(2, 7, 32, dtype=torch.double), torch.randn(2, 3, 32, dtype=torch.double)
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1)
    torch.testing.assert_close(ours(x, memory, causal=True)[0], ref(x, memory, tgt_mask=mask), atol=1e-12, rtol=1e-12)


def test_swapped_layer_follows_the_spec_formula():
    """docs/official.md §2.3: x += CA(x, mem) with un-normalised queries; x += SA(norm1(x)); x += FF(norm3(x))."""
    layer = _randomise(TransformerDecoderLayer(32, 4, 64, 0.0, True, False, cross_first=True).double()).eval()
    assert "norm2.weight" not in layer.state_dict()
    x, mem = torch.randn(2, 5, 32, dtype=torch.double), torch.randn(2, 11, 32, dtype=torch.double)

    def mha(module, q, kv):
        ref = nn.MultiheadAttention(32, 4, bias=False, batch_first=True).double()
        ref.load_state_dict(module.state_dict())
        return ref(q, kv, kv, need_weights=False)[0]

    expected = x + mha(layer.multihead_attn, x, mem)
    h = layer.norm1(expected)
    expected = expected + mha(layer.self_attn, h, h)
    expected = expected + layer.linear2(nn.functional.gelu(layer.linear1(layer.norm3(expected))))
    torch.testing.assert_close(layer(x, mem)[0], expected, atol=1e-12, rtol=1e-12)


def test_attention_dropout_only_in_training():
    layer = TransformerDecoderLayer(32, 4, 64, 0.5, norm_first=False).double()
    x, memory = torch.randn(2, 7, 32, dtype=torch.double), torch.randn(2, 3, 32, dtype=torch.double)
    layer.eval()
    assert torch.equal(layer(x, memory)[0], layer(x, memory)[0])
    layer.train()
    assert not torch.equal(layer(x, memory)[0], layer(x, memory)[0])

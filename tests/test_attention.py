"""Multi-head attention written out == torch.nn.MultiheadAttention."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detr_tutorial.models import MultiheadAttention, scaled_dot_product_attention


def pair(embed_dim, num_heads, seed=0):
    torch.manual_seed(seed)
    ours = MultiheadAttention(embed_dim, num_heads)
    ref = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
    with torch.no_grad():  # non-zero biases so that every parameter matters
        for p in ours.parameters():
            p.normal_(0, 0.3)
    ref.load_state_dict(ours.state_dict())
    return ours.eval(), ref.eval()


def test_state_dict_names_match_torch():
    ours = MultiheadAttention(16, 4)
    ref = nn.MultiheadAttention(16, 4)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("embed_dim,num_heads,lq,lk", [(16, 4, 5, 7), (12, 1, 3, 3), (24, 8, 9, 4)])
def test_cross_attention_matches_torch(embed_dim, num_heads, lq, lk):
    ours, ref = pair(embed_dim, num_heads)
    q, k, v = torch.randn(2, lq, embed_dim), torch.randn(2, lk, embed_dim), torch.randn(2, lk, embed_dim)
    kpm = torch.zeros(2, lk, dtype=torch.bool)
    kpm[1, lk // 2:] = True
    for average in (True, False):
        out, w = ours(q, k, v, key_padding_mask=kpm, average_attn_weights=average)
        out_ref, w_ref = ref(q, k, v, key_padding_mask=kpm, average_attn_weights=average)
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(w, w_ref)
    assert ours(q, k, v, need_weights=False)[1] is None


def test_self_attention_with_attn_mask_matches_torch():
    ours, ref = pair(16, 2, seed=1)
    x = torch.randn(3, 6, 16)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)  # True = blocked
    out, w = ours(x, x, x, attn_mask=causal)
    out_ref, w_ref = ref(x, x, x, attn_mask=causal)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(w, w_ref)
    assert (w[:, 0, 1:] == 0).all()


def test_core_matches_torch_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, 5:] = True
    out, w = scaled_dot_product_attention(q, k, v, key_padding_mask=kpm)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=~kpm[:, None, None, :])  # torch: True = attend
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5))
    assert (w[0, ..., 5:] == 0).all()


def test_padded_keys_and_values_are_ignored():
    ours, _ = pair(16, 4)
    q, k, v = torch.randn(1, 4, 16), torch.randn(1, 6, 16), torch.randn(1, 6, 16)
    kpm = torch.tensor([[False, False, False, False, True, True]])
    out = ours(q, k, v, key_padding_mask=kpm)[0]
    k2, v2 = k.clone(), v.clone()
    k2[:, 4:], v2[:, 4:] = 100.0, -100.0
    torch.testing.assert_close(ours(q, k2, v2, key_padding_mask=kpm)[0], out)
    torch.testing.assert_close(ours(q, k[:, :4], v[:, :4])[0], out)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    attn = MultiheadAttention(16, 4, dropout=0.5)
    x = torch.randn(2, 5, 16)
    attn.eval()
    torch.testing.assert_close(attn(x, x, x)[0], attn(x, x, x)[0])
    attn.train()
    assert not torch.allclose(attn(x, x, x)[0], attn(x, x, x)[0])


def test_gradients_reach_every_parameter():
    attn = MultiheadAttention(8, 2)
    x = torch.randn(2, 3, 8, requires_grad=True)
    attn(x, x, x)[0].square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_errors():
    with pytest.raises(ValueError, match="divide"):
        MultiheadAttention(10, 4)
    attn = MultiheadAttention(8, 2)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="query"):
        attn(torch.randn(2, 3, 7), x, x)
    with pytest.raises(ValueError, match="share"):
        attn(x, x, torch.randn(2, 4, 8))
    with pytest.raises(TypeError, match="bool"):
        attn(x, x, x, key_padding_mask=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        attn(x, x, x, attn_mask=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="NaN"):
        attn(x, x, x, key_padding_mask=torch.tensor([[True, True, True], [False, False, False]]))

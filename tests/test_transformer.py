"""DETR transformer: official vectors, equality with torch layers, padding invariance."""
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from detr_tutorial.models import (PositionEmbeddingSine, Transformer, TransformerDecoderLayer,
                                  TransformerEncoderLayer)

VECTORS = Path(__file__).parent / "data" / "official_vectors.pt"
REFERENCE = Path(__file__).parent / "data" / "detr_reference.pt"


@pytest.fixture(scope="module")
def official():
    return torch.load(VECTORS, weights_only=False)["transformer"]


def check_against_official(ref):
    """Load an official state dict, run the stored inputs, compare with the official outputs."""
    model = Transformer(**ref["kwargs"]).eval()
    assert set(model.state_dict()) == set(ref["state_dict"])
    model.load_state_dict(ref["state_dict"])
    assert ref["mask"].any(), "the stored case should contain padding"
    with torch.no_grad():
        hs, memory = model(ref["src"], ref["mask"], ref["query_embed"], ref["pos_embed"])
    assert hs.shape == ref["hs"].shape
    torch.testing.assert_close(hs, ref["hs"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(memory, ref["memory"], atol=1e-5, rtol=1e-5)


def test_matches_official_vectors(official):
    assert not official["kwargs"]["normalize_before"]
    check_against_official(official)


def test_pre_norm_matches_official_vectors():
    """Official DETR outputs with normalize_before=True (tests/data/make_detr_reference.py): every
    parameter, each LayerNorm included, differs from its initial value, so a norm dropped, moved or
    swapped with another changes the result."""
    ref = torch.load(REFERENCE, weights_only=False)["transformer_pre_norm"]
    assert ref["kwargs"]["normalize_before"] and ref["kwargs"]["return_intermediate_dec"]
    assert ref["hs"].shape == (2, 2, 7, 32)  # every decoder layer's output
    check_against_official(ref)


def test_last_layer_only_without_intermediate(official):
    kwargs = dict(official["kwargs"], return_intermediate_dec=False)
    model = Transformer(**kwargs).eval()
    model.load_state_dict(official["state_dict"])
    hs, _ = model(official["src"], official["mask"], official["query_embed"], official["pos_embed"])
    assert hs.shape == (1, *official["hs"].shape[1:])
    torch.testing.assert_close(hs[0], official["hs"][-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_encoder_layer_equals_torch(pre_norm):
    torch.manual_seed(0)
    ours = TransformerEncoderLayer(16, 4, 32, 0.0, "relu", pre_norm)
    ref = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=pre_norm)
    ref.load_state_dict(ours.state_dict())  # same parameter names
    ref.train()  # the slow path: the fast path zeroes padded outputs
    src = torch.randn(2, 7, 16)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    torch.testing.assert_close(ours(src, kpm, pos=torch.zeros_like(src)), ref(src, src_key_padding_mask=kpm))


def test_decoder_layer_equals_torch():
    torch.manual_seed(0)
    ours = TransformerDecoderLayer(16, 4, 32, 0.0, "relu", False)
    ref = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    tgt, memory = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, 4:] = True
    torch.testing.assert_close(ours(tgt, memory, kpm), ref(tgt, memory, memory_key_padding_mask=kpm))


def test_positions_enter_queries_and_keys_not_values():
    """With a single key the attention weight is 1 whatever q and k are, so the
    output may only depend on the value: adding positions must change nothing."""
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(8, 2, 16, 0.0, "relu", False).eval()
    src = torch.randn(3, 1, 8)
    torch.testing.assert_close(layer(src, pos=10 * torch.randn(3, 1, 8)), layer(src))


def test_identical_queries_give_identical_outputs():
    torch.manual_seed(0)
    model = Transformer(16, 2, 1, 2, 32, dropout=0.0).eval()
    src, pos = torch.randn(1, 16, 3, 4), torch.randn(1, 16, 3, 4)
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    queries = torch.randn(1, 16).repeat(5, 1)
    hs = model(src, mask, queries, pos)[0][0, 0]  # (Q, d)
    torch.testing.assert_close(hs, hs[:1].expand_as(hs))
    queries[3] += 1.0
    hs = model(src, mask, queries, pos)[0][0, 0]
    assert not torch.allclose(hs[3], hs[0], atol=1e-3)


@settings(max_examples=10)
@given(h=st.integers(1, 4), w=st.integers(1, 4), pad_h=st.integers(0, 2), pad_w=st.integers(1, 2),
       pre_norm=st.booleans(), seed=st.integers(0, 100))
def test_padding_invariance(h, w, pad_h, pad_w, pre_norm, seed):
    """A padded feature map (garbage in the padding, mask set) decodes exactly as
    the unpadded one: the encoding counts only valid pixels and both the encoder
    self-attention and the decoder cross-attention mask the padded keys."""
    torch.manual_seed(seed)
    d = 16
    model = Transformer(d, 4, 2, 2, 32, dropout=0.0, normalize_before=pre_norm,
                        return_intermediate_dec=True).eval()
    enc = PositionEmbeddingSine(d // 2, normalize=True)
    queries = torch.randn(5, d)
    src = torch.randn(1, d, h, w)
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    hs, memory = model(src, mask, queries, enc(mask))

    big = torch.randn(2, d, h + pad_h, w + pad_w) * 5  # image 0 padded with noise, image 1 full size
    big[0, :, :h, :w] = src[0]
    big_mask = torch.zeros(2, h + pad_h, w + pad_w, dtype=torch.bool)
    big_mask[0, h:, :] = True
    big_mask[0, :, w:] = True
    hs_big, memory_big = model(big, big_mask, queries, enc(big_mask))
    torch.testing.assert_close(hs_big[:, :1], hs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(memory_big[:1, :, :h, :w], memory, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(memory_big).all()


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = Transformer(16, 2, 2, 2, 32, dropout=0.1, return_intermediate_dec=True).train()
    src, pos = torch.randn(2, 16, 3, 3), torch.randn(2, 16, 3, 3)
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[1, 2:] = True
    query = torch.randn(4, 16, requires_grad=True)
    with torch.no_grad():  # biases start at zero; give them the values one step of training would
        for name, p in model.named_parameters():
            if name.endswith("in_proj_bias"):
                p.normal_()
    hs, memory = model(src, mask, query, pos)
    (hs.square().sum() + memory.sum()).backward()
    # The first decoder self-attention sees tgt = 0: all its values equal the
    # value bias, so its attention weights -- and the q/k/v projection
    # matrices -- cannot change the output. The official model has the same
    # dead weight; everything else must receive a gradient.
    dead = "decoder.layers.0.self_attn.in_proj_weight"
    for name, p in model.named_parameters():
        if name == dead:
            assert p.grad is None or p.grad.abs().max() < 1e-6  # zero up to rounding
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert query.grad.abs().sum() > 0


def test_pre_norm_adds_encoder_norm():
    keys = set(Transformer(16, 2, 1, 1, 32, normalize_before=True).state_dict())
    assert "encoder.norm.weight" in keys and "decoder.norm.weight" in keys
    assert "encoder.norm.weight" not in set(Transformer(16, 2, 1, 1, 32).state_dict())


def test_errors():
    model = Transformer(16, 2, 1, 1, 32)
    src, pos, q = torch.randn(1, 16, 2, 3), torch.randn(1, 16, 2, 3), torch.randn(4, 16)
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="src"):
        model(torch.randn(1, 8, 2, 3), mask, q, pos)
    with pytest.raises(ValueError, match="mask"):
        model(src, torch.zeros(1, 3, 2, dtype=torch.bool), q, pos)
    with pytest.raises(TypeError, match="bool"):
        model(src, mask.float(), q, pos)
    with pytest.raises(ValueError, match="pos_embed"):
        model(src, mask, q, pos[:, :, :1])
    with pytest.raises(ValueError, match="query_embed"):
        model(src, mask, torch.randn(4, 8), pos)
    with pytest.raises(ValueError, match="activation"):
        Transformer(16, 2, 1, 1, 32, activation="glu")

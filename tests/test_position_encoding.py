"""Sine and learned positional encodings: official vectors, closed form, padding, errors."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from detr_tutorial.models import PositionEmbeddingLearned, PositionEmbeddingSine

VECTORS = Path(__file__).parent / "data" / "official_vectors.pt"


@pytest.fixture(scope="module")
def sine_cases():
    return torch.load(VECTORS, weights_only=False)["position_embedding_sine"]


def test_matches_official_vectors(sine_cases):
    assert len(sine_cases) == 3
    for case in sine_cases:
        pos = PositionEmbeddingSine(**case["kwargs"])(case["mask"])
        torch.testing.assert_close(pos, case["pos"])


def closed_form(h_valid, w_valid, H, W, num_pos_feats, temperature, normalize, offset=0.0):
    """Expected encoding of one image whose valid region is the top-left (h_valid, w_valid),
    computed per entry with the math module (channel c: wavelength T^(2*floor(c/2)/F))."""
    out = np.zeros((2 * num_pos_feats, H, W))
    for i in range(h_valid):
        for j in range(w_valid):
            y, x = i + 1.0, j + 1.0
            if normalize:
                y = (y + offset) / (h_valid + 1e-6) * 2 * math.pi
                x = (x + offset) / (w_valid + 1e-6) * 2 * math.pi
            for c in range(num_pos_feats):
                wavelength = temperature ** (2 * (c // 2) / num_pos_feats)
                f = math.sin if c % 2 == 0 else math.cos
                out[c, i, j] = f(y / wavelength)
                out[num_pos_feats + c, i, j] = f(x / wavelength)
    return torch.tensor(out, dtype=torch.float32)


@given(h=st.integers(1, 6), w=st.integers(1, 6), pad_h=st.integers(0, 3), pad_w=st.integers(0, 3),
       feats=st.sampled_from([2, 4, 8]), temperature=st.sampled_from([20.0, 10000.0]),
       normalize=st.booleans())
def test_closed_form_on_valid_region(h, w, pad_h, pad_w, feats, temperature, normalize):
    mask = torch.ones(1, h + pad_h, w + pad_w, dtype=torch.bool)
    mask[0, :h, :w] = False
    pos = PositionEmbeddingSine(feats, temperature, normalize=normalize)(mask)[0]
    assert pos.shape == (2 * feats, h + pad_h, w + pad_w)
    expected = closed_form(h, w, h + pad_h, w + pad_w, feats, temperature, normalize)
    torch.testing.assert_close(pos[:, :h, :w], expected[:, :h, :w], atol=1e-5, rtol=1e-5)


def test_offset_shifts_to_pixel_centres():
    mask = torch.zeros(1, 3, 5, dtype=torch.bool)
    pos = PositionEmbeddingSine(4, normalize=True, offset=-0.5)(mask)[0]
    torch.testing.assert_close(pos, closed_form(3, 5, 3, 5, 4, 10000, True, offset=-0.5), atol=1e-5, rtol=1e-5)
    # channel 1 of y is cos(y) with wavelength 1: y = (i + 0.5) / 3 * 2pi
    torch.testing.assert_close(pos[1, :, 0], torch.cos(torch.tensor([0.5, 1.5, 2.5]) / 3 * 2 * math.pi),
                               atol=1e-5, rtol=1e-5)


@given(h=st.integers(1, 7), w=st.integers(1, 7), pad_h=st.integers(1, 4), pad_w=st.integers(0, 4))
def test_valid_pixels_do_not_see_the_padding(h, w, pad_h, pad_w):
    enc = PositionEmbeddingSine(8, normalize=True)
    alone = enc(torch.zeros(1, h, w, dtype=torch.bool))
    mask = torch.ones(1, h + pad_h, w + pad_w, dtype=torch.bool)
    mask[0, :h, :w] = False
    padded = enc(mask)
    torch.testing.assert_close(padded[..., :h, :w], alone)
    assert torch.isfinite(padded).all()


def test_batch_elements_are_independent():
    enc = PositionEmbeddingSine(8, normalize=True)
    mask = torch.zeros(2, 6, 7, dtype=torch.bool)
    mask[1, 4:, :] = True
    mask[1, :, 5:] = True
    pos = enc(mask)
    torch.testing.assert_close(pos[0], enc(mask[:1])[0])
    torch.testing.assert_close(pos[1, :, :4, :5], enc(torch.zeros(1, 4, 5, dtype=torch.bool))[0])


def test_sine_errors():
    with pytest.raises(ValueError, match="normalize=True"):
        PositionEmbeddingSine(scale=1.0)
    with pytest.raises(ValueError, match="normalize=True"):
        PositionEmbeddingSine(offset=-0.5)
    with pytest.raises(ValueError, match="num_pos_feats"):
        PositionEmbeddingSine(7)
    enc = PositionEmbeddingSine(4)
    with pytest.raises(TypeError, match="bool"):
        enc(torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        enc(torch.zeros(3, 3, dtype=torch.bool))


def test_learned_layout_and_limits():
    torch.manual_seed(0)
    enc = PositionEmbeddingLearned(3)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    pos = enc(mask)
    assert pos.shape == (2, 6, 4, 5)
    i, j = 2, 3
    torch.testing.assert_close(pos[1, :, i, j], torch.cat([enc.col_embed.weight[j], enc.row_embed.weight[i]]))
    torch.testing.assert_close(pos[0], pos[1])
    assert enc.row_embed.weight.shape == (50, 3)
    with pytest.raises(ValueError, match="50x50"):
        enc(torch.zeros(1, 51, 4, dtype=torch.bool))

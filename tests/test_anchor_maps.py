"""anchor_attention_map: DAB-DETR's modulated positional attention of one anchor (paper eq. 6)."""
import math

import pytest
import torch

from detr_tutorial.models.anchor_maps import anchor_attention_map, attention_spread


def cosine_sum(delta, num_pos_feats, temperature):
    """PE(a) . PE(b) written out: sin/cos pairs at one frequency give cos(2 pi (a - b) / T^(2k/F))."""
    return sum(math.cos(2 * math.pi * delta / temperature ** (2 * k / num_pos_feats))
               for k in range(num_pos_feats // 2))


def test_map_is_the_papers_formula():
    anchor, size, ref_wh, feats, temp = (0.3, 0.6, 0.2, 0.4), (5, 7), (0.5, 0.8), 16, 20
    weights = anchor_attention_map(anchor, size, ref_wh, feats, temp)
    logits = torch.tensor([[(cosine_sum((j + 0.5) / 7 - 0.3, feats, temp) * 0.5 / 0.2
                             + cosine_sum((i + 0.5) / 5 - 0.6, feats, temp) * 0.8 / 0.4) / math.sqrt(2 * feats)
                            for j in range(7)] for i in range(5)])
    torch.testing.assert_close(weights, logits.flatten().softmax(0).view(5, 7))
    unmodulated = anchor_attention_map(anchor, size, None, feats, temp)
    logits = torch.tensor([[(cosine_sum((j + 0.5) / 7 - 0.3, feats, temp)
                             + cosine_sum((i + 0.5) / 5 - 0.6, feats, temp)) / math.sqrt(2 * feats)
                            for j in range(7)] for i in range(5)])
    torch.testing.assert_close(unmodulated, logits.flatten().softmax(0).view(5, 7))


def test_peak_at_the_centre_and_spread_follows_the_anchor():
    wide = anchor_attention_map((0.25, 0.75, 0.6, 0.1), (32, 48))
    assert wide.shape == (32, 48)
    torch.testing.assert_close(wide.sum(), torch.tensor(1.0))
    row, col = divmod(int(wide.argmax()), 48)
    assert (row, col) in {(23, 11), (23, 12), (24, 11), (24, 12)}  # the pixels around (0.25, 0.75)
    sx, sy = attention_spread(wide)
    assert sx > 1.5 * sy  # a wide anchor attends further along x
    tall_sx, tall_sy = attention_spread(anchor_attention_map((0.25, 0.75, 0.1, 0.6), (48, 48)))
    assert tall_sy > 1.5 * tall_sx
    flat_sx, flat_sy = attention_spread(anchor_attention_map((0.5, 0.5, 0.6, 0.1), (48, 48), ref_wh=None))
    assert flat_sx == pytest.approx(flat_sy)  # without the modulation the size does not matter


def test_spread_of_a_known_map():
    weights = torch.zeros(4, 4)
    weights[1, 0] = weights[1, 2] = 0.5  # x at 0.125 and 0.625, y at 0.375
    sx, sy = attention_spread(weights)
    assert sx == pytest.approx(0.25) and sy == pytest.approx(0.0)


def test_bad_input():
    with pytest.raises(ValueError, match=r"anchor must be \(cx, cy, w, h\)"):
        anchor_attention_map((0.5, 0.5, 0.1), (8, 8))
    with pytest.raises(ValueError, match="w, h > 0"):
        anchor_attention_map((0.5, 0.5, 0.0, 0.1), (8, 8))
    with pytest.raises(ValueError, match="anchor must lie in"):
        anchor_attention_map((1.5, 0.5, 0.1, 0.1), (8, 8))
    with pytest.raises(ValueError, match="size must be"):
        anchor_attention_map((0.5, 0.5, 0.1, 0.1), (8, 0))
    with pytest.raises(ValueError, match="ref_wh"):
        anchor_attention_map((0.5, 0.5, 0.1, 0.1), (8, 8), ref_wh=(0.0, 0.5))
    with pytest.raises(ValueError, match=r"\(H, W\) tensor"):
        attention_spread(torch.rand(8))

"""box_ops: conversions, IoU, GIoU -- properties, official and hand-computed values, clear errors."""
import math

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from detr_tutorial import box_ops

REFERENCE = Path(__file__).parent / "data" / "detr_reference.pt"


@st.composite
def xyxy_boxes(draw, min_n=1, max_n=6):
    n = draw(st.integers(min_n, max_n))
    coord = st.floats(0, 100, allow_nan=False, width=32)
    size = st.floats(0.5, 50, allow_nan=False, width=32)
    rows = [[x, y, x + w, y + h] for x, y, w, h in
            (draw(st.tuples(coord, coord, size, size)) for _ in range(n))]
    return torch.tensor(rows, dtype=torch.float64)


@given(xyxy_boxes(), xyxy_boxes())
def test_iou_symmetric_and_in_unit_interval(a, b):
    iou_ab, union_ab = box_ops.box_iou(a, b)
    iou_ba, _ = box_ops.box_iou(b, a)
    torch.testing.assert_close(iou_ab, iou_ba.T)
    assert (iou_ab >= 0).all() and (iou_ab <= 1 + 1e-12).all()
    assert (union_ab > 0).all()


@given(xyxy_boxes(), xyxy_boxes())
def test_giou_bounded_by_minus_one_and_iou(a, b):
    iou, _ = box_ops.box_iou(a, b)
    giou = box_ops.generalized_box_iou(a, b)
    assert (giou >= -1 - 1e-12).all()
    assert (giou <= iou + 1e-12).all()


@given(xyxy_boxes())
def test_iou_of_box_with_itself_is_one(a):
    iou, _ = box_ops.box_iou(a, a)
    torch.testing.assert_close(iou.diagonal(), torch.ones(len(a), dtype=a.dtype))
    torch.testing.assert_close(box_ops.generalized_box_iou(a, a).diagonal(), torch.ones(len(a), dtype=a.dtype))


@given(xyxy_boxes())
def test_conversions_round_trip(a):
    torch.testing.assert_close(box_ops.box_cxcywh_to_xyxy(box_ops.box_xyxy_to_cxcywh(a)), a)
    c = box_ops.box_xyxy_to_cxcywh(a)
    torch.testing.assert_close(box_ops.box_xyxy_to_cxcywh(box_ops.box_cxcywh_to_xyxy(c)), c)


def test_conversion_known_values():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(box_ops.box_cxcywh_to_xyxy(cxcywh), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))


def test_matches_official_detr_values():
    """Official ``util/box_ops`` results stored by tests/data/make_detr_reference.py (float64,
    hand-picked and random pairs, one zero-area box)."""
    ref = torch.load(REFERENCE, weights_only=False)["generalized_box_iou"]
    torch.testing.assert_close(box_ops.generalized_box_iou(ref["boxes1"], ref["boxes2"]), ref["giou"],
                               rtol=1e-12, atol=1e-12)
    iou, union = box_ops.box_iou(ref["boxes1"], ref["boxes2"])
    torch.testing.assert_close(iou, ref["iou"], rtol=1e-12, atol=1e-12)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    torch.testing.assert_close(union, area(ref["boxes1"])[:, None] + area(ref["boxes2"])[None] - iou * union)


# (box a, box b, IoU, GIoU) worked out by hand: intersection I, union U, enclosing box area E,
# IoU = I / U, GIoU = IoU - (E - U) / E.
HAND_CASES = [
    ([0, 0, 1, 1], [0, 0, 1, 1], 1.0, 1.0),  # identical
    ([0, 0, 4, 4], [1, 1, 3, 3], 4 / 16, 4 / 16),  # nested: E = U = 16
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - 2 / 9),  # I 1, U 7, E 9
    ([0, 0, 1, 1], [1, 0, 2, 1], 0.0, 0.0),  # touching: I 0, U = E = 2
    ([0, 0, 1, 1], [2, 2, 3, 3], 0.0, -7 / 9),  # diagonal: U 2, E 9
    ([0, 0, 2, 1], [1, 0, 3, 1], 1 / 3, 1 / 3),  # side by side: I 1, U 3 = E
    ([0.5, 0.5, 0.5, 0.5], [0, 0, 1, 1], 0.0, 0.0),  # zero-area box inside: U = E = 1
]


@pytest.mark.parametrize("a, b, iou, giou", HAND_CASES)
def test_hand_computed_iou_and_giou(a, b, iou, giou):
    a, b = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    assert box_ops.box_iou(a, b)[0].item() == pytest.approx(iou, abs=1e-12)
    assert box_ops.generalized_box_iou(a, b).item() == pytest.approx(giou, abs=1e-12)
    assert box_ops.generalized_box_iou(b, a).item() == pytest.approx(giou, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_boxes_are_computed_in_float32(dtype):
    # 300-pixel boxes: the area 90,000 overflows float16 (max 65,504).
    big = torch.tensor([[10.0, 20.0, 310.0, 320.0]], dtype=dtype)
    assert box_ops.box_area(big).dtype == torch.float32 and box_ops.box_area(big).item() == 90_000
    iou, union = box_ops.box_iou(big, big)
    assert iou.dtype == union.dtype == torch.float32
    assert iou.item() == 1.0 and union.item() == 90_000
    assert box_ops.generalized_box_iou(big, big).item() == 1.0
    # Tiny normalised boxes: areas of 1e-8 and 9e-8 underflow float16 (computed there, the IoU of
    # these boxes with themselves came out as 0.0 and 0.51).
    tiny = torch.tensor([[0.0, 0.0, 1e-4, 1e-4], [0.01, 0.01, 0.0103, 0.0103]], dtype=dtype)
    torch.testing.assert_close(box_ops.box_iou(tiny, tiny)[0].diagonal(), torch.ones(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(box_ops.generalized_box_iou(tiny, tiny).diagonal(), torch.ones(2), rtol=0, atol=1e-6)
    # float32 and float64 keep their dtype
    assert box_ops.generalized_box_iou(big.double(), big.double()).dtype == torch.float64


def test_batched_helpers_equal_per_image_calls():
    """``pairwise_iou_union`` / ``giou_from_iou_union`` with a leading batch dimension give the
    blocks that separate (N, 4) x (M, 4) calls give."""
    g = torch.Generator().manual_seed(0)
    a = box_ops.box_cxcywh_to_xyxy(torch.rand(3, 5, 4, generator=g) * 0.5 + 0.1)
    b = box_ops.box_cxcywh_to_xyxy(torch.rand(3, 2, 4, generator=g) * 0.5 + 0.1)
    iou, union = box_ops.pairwise_iou_union(a, b)
    giou = box_ops.giou_from_iou_union(a, b, iou, union)
    assert giou.shape == (3, 5, 2)
    for i in range(3):
        torch.testing.assert_close(iou[i], box_ops.box_iou(a[i], b[i])[0], rtol=0, atol=0)
        torch.testing.assert_close(giou[i], box_ops.generalized_box_iou(a[i], b[i]), rtol=0, atol=0)


def test_giou_known_value_for_disjoint_boxes():
    # Two unit squares one unit apart: IoU 0, enclosing box 3 x 1, union 2 -> GIoU = 0 - (3 - 2) / 3.
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    assert math.isclose(box_ops.generalized_box_iou(a, b).item(), -1 / 3, rel_tol=1e-6)


def test_empty_box_sets_give_empty_results():
    a = torch.zeros((0, 4))
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    iou, union = box_ops.box_iou(a, b)
    assert iou.shape == (0, 1) and union.shape == (0, 1)
    assert box_ops.generalized_box_iou(b, a).shape == (1, 0)
    assert box_ops.box_cxcywh_to_xyxy(torch.zeros((0, 4))).shape == (0, 4)


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[0.5, 0.5, 0.2, 0.9]]), r"degenerate boxes \(x1 < x0 or y1 < y0\) in rows \[0\]"),
    (torch.tensor([[0.0, 0.0, 1.0, float("nan")]]), r"non-finite values .* rows \[0\]"),
    (torch.tensor([[0.0, 0.0, float("inf"), 1.0]]), r"non-finite"),
    (torch.zeros((3,)), r"shape \(N, 4\)"),
    (torch.zeros((2, 5)), r"shape \(N, 4\)"),
])
def test_bad_boxes_raise_clear_errors(bad, message):
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=message):
        box_ops.generalized_box_iou(bad, good)
    with pytest.raises(ValueError, match=message):
        box_ops.box_iou(good, bad)


def test_degenerate_row_is_named():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 0.4, 1.0]])
    with pytest.raises(ValueError, match=r"boxes2 has degenerate boxes .* rows \[2\]"):
        box_ops.box_iou(boxes[:1], boxes)


def test_integer_and_non_tensor_boxes_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        box_ops.box_iou(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 0, 1, 1]]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        box_ops.generalized_box_iou([[0.0, 0.0, 1.0, 1.0]], torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\)"):
        box_ops.box_cxcywh_to_xyxy(torch.zeros(2, 3))


def test_two_zero_area_boxes_raise_instead_of_nan():
    p = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    with pytest.raises(ValueError, match="zero area"):
        box_ops.box_iou(p, p)
    with pytest.raises(ValueError, match="zero area"):
        box_ops.generalized_box_iou(p, p)
    # One zero-area box against a real box is well defined.
    iou, _ = box_ops.box_iou(p, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert iou.item() == 0.0

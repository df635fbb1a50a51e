"""box_ops: conversions, IoU, GIoU -- properties, agreement with torchvision, clear errors."""
import math

import pytest
import torch
import torchvision.ops as tv_ops
from hypothesis import given
from hypothesis import strategies as st

from detr_tutorial import box_ops


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


def test_agrees_with_torchvision():
    g = torch.Generator().manual_seed(0)
    a = box_ops.box_cxcywh_to_xyxy(torch.rand(20, 4, generator=g) * 0.5 + 0.1)
    b = box_ops.box_cxcywh_to_xyxy(torch.rand(30, 4, generator=g) * 0.5 + 0.1)
    iou, union = box_ops.box_iou(a, b)
    torch.testing.assert_close(iou, tv_ops.box_iou(a, b))
    inter = iou * union
    torch.testing.assert_close(union, tv_ops.box_area(a)[:, None] + tv_ops.box_area(b)[None] - inter)
    torch.testing.assert_close(box_ops.generalized_box_iou(a, b), tv_ops.generalized_box_iou(a, b))


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

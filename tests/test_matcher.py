"""Tests for detr_tutorial.matcher: official parity, optimality, edge cases."""
import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from detr_tutorial.matcher import HungarianMatcher

VECTORS = torch.load(Path(__file__).parent / "data" / "official_vectors.pt", weights_only=False)


def random_case(seed, batch=2, queries=6, classes=3, sizes=(2, 0), focal=False):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": 2 * torch.randn(batch, queries, classes + (0 if focal else 1), generator=g),
        "pred_boxes": torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.25,
    }
    targets = []
    for n in sizes:
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, classes, (n,), generator=g), "boxes": torch.cat([cxcy, wh], 1)})
    return outputs, targets


def focal_or_softmax_matcher(focal):
    """Deformable DETR's matcher (focal class cost, weights 2 / 5 / 2) or DETR's (1 / 5 / 2), 3 classes."""
    if focal:
        return HungarianMatcher(num_classes=3, cost_class=2, focal_alpha=0.25)
    return HungarianMatcher(num_classes=3)


def giou_by_hand(a, b):
    """GIoU of two (cx, cy, w, h) boxes, written out from the definition."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


@pytest.mark.parametrize("case", range(len(VECTORS["hungarian_matcher"]["cases"])))
def test_official_cases(case):
    ref = VECTORS["hungarian_matcher"]
    data = ref["cases"][case]
    matcher = HungarianMatcher(num_classes=4, **ref["costs"])  # logits (3, 15, 5): 4 classes + no object
    indices = matcher(data["outputs"], data["targets"])
    assert len(indices) == len(data["indices"])
    for (i, j), (ri, rj) in zip(indices, data["indices"]):
        assert i.dtype == j.dtype == torch.int64
        assert torch.equal(i, ri) and torch.equal(j, rj)


@pytest.mark.parametrize("focal", [False, True])
def test_cost_matrix_matches_formula_entry_by_entry(focal):
    outputs, targets = random_case(1, sizes=(3, 2), focal=focal)
    matcher = focal_or_softmax_matcher(focal)
    C = matcher.cost_matrix(outputs, targets)
    labels = torch.cat([t["labels"] for t in targets]).tolist()
    boxes = torch.cat([t["boxes"] for t in targets]).tolist()
    assert C.shape == (2, 6, 5)
    for b, q, t in itertools.product(range(2), range(6), range(5)):
        logits = outputs["pred_logits"][b, q].double()
        pred = outputs["pred_boxes"][b, q].tolist()
        if focal:
            p = torch.sigmoid(logits[labels[t]]).item()
            pos = 0.25 * (1 - p) ** 2 * -torch.log(torch.tensor(p + 1e-8)).item()
            neg = 0.75 * p ** 2 * -torch.log(torch.tensor(1 - p + 1e-8)).item()
            cls = 2 * (pos - neg)
        else:
            cls = -torch.softmax(logits, -1)[labels[t]].item()
        l1 = sum(abs(x - y) for x, y in zip(pred, boxes[t]))
        expected = cls + 5 * l1 - 2 * giou_by_hand(pred, boxes[t])
        assert C[b, q, t].item() == pytest.approx(expected, abs=1e-5)


@given(queries=st.integers(1, 5), data=st.data(), focal=st.booleans(), seed=st.integers(0, 10_000))
def test_assignment_is_optimal_against_brute_force(queries, data, focal, seed):
    n = data.draw(st.integers(0, queries))
    outputs, targets = random_case(seed, batch=1, queries=queries, sizes=(n,), focal=focal)
    matcher = focal_or_softmax_matcher(focal)
    C = matcher.cost_matrix(outputs, targets)[0]  # (Q, n)
    (i, j), = matcher(outputs, targets)
    # one-to-one: every target used once, every prediction at most once
    assert len(i) == len(j) == n
    assert sorted(j.tolist()) == list(range(n)) and len(set(i.tolist())) == n
    best = min((sum(C[q, t].item() for t, q in enumerate(perm)) for perm in itertools.permutations(range(queries), n)),
               default=0.0)
    assert C[i, j].sum().item() == pytest.approx(best, abs=1e-5)


def test_batch_matching_equals_per_image_matching():
    outputs, targets = random_case(2, batch=3, sizes=(2, 0, 4))
    matcher = HungarianMatcher(num_classes=3)
    together = matcher(outputs, targets)
    for b in range(3):
        alone, = matcher({k: v[b:b + 1] for k, v in outputs.items()}, targets[b:b + 1])
        assert torch.equal(together[b][0], alone[0]) and torch.equal(together[b][1], alone[1])


def test_cost_has_no_gradient():
    outputs, targets = random_case(3)
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    matcher = HungarianMatcher(num_classes=3)
    assert not matcher.cost_matrix(outputs, targets).requires_grad
    for i, j in matcher(outputs, targets):
        assert not i.requires_grad and not j.requires_grad
    assert outputs["pred_logits"].grad is None


def test_images_without_objects_give_empty_int64_pairs():
    outputs, targets = random_case(4, sizes=(0, 0))
    for i, j in HungarianMatcher(num_classes=3)(outputs, targets):
        assert i.shape == j.shape == (0,) and i.dtype == j.dtype == torch.int64


def test_more_targets_than_queries_is_an_error():
    outputs, targets = random_case(5, queries=3, sizes=(2, 4))
    with pytest.raises(ValueError, match=r"targets\[1\] has 4 objects.*raise num_queries"):
        HungarianMatcher(num_classes=3)(outputs, targets)


@pytest.mark.parametrize("label", [-1, 3, 7])
def test_labels_out_of_range(label):
    outputs, targets = random_case(6)
    targets[0]["labels"][0] = label  # 3 classes: 0..2 valid, 3 is "no object"
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must lie in \[0, 2\]"):
        HungarianMatcher(num_classes=3)(outputs, targets)


@pytest.mark.parametrize("row", [[0.5, 0.5, -0.1, 0.2], [1.2, 0.5, 0.1, 0.2], [0.5, 0.5, 0.0, 0.2],
                                 [0.5, float("nan"), 0.1, 0.2]])
def test_boxes_must_be_normalised_cxcywh(row):
    outputs, targets = random_case(7)
    targets[0]["boxes"][1] = torch.tensor(row)
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\] must be normalised"):
        HungarianMatcher(num_classes=3)(outputs, targets)


def test_target_count_must_match_batch():
    outputs, targets = random_case(8)
    with pytest.raises(ValueError, match="targets has 1 entries but the outputs hold 2 images"):
        HungarianMatcher(num_classes=3)(outputs, targets[:1])


def test_wrong_shapes_and_types():
    outputs, targets = random_case(9)
    m = HungarianMatcher(num_classes=3)
    with pytest.raises(ValueError, match="pred_boxes"):
        m({"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"][..., :3]}, targets)
    with pytest.raises(ValueError, match="pred_logits"):
        m({"pred_logits": outputs["pred_logits"][0], "pred_boxes": outputs["pred_boxes"]}, targets)
    with pytest.raises(ValueError, match="no 'pred_boxes'"):
        m({"pred_logits": outputs["pred_logits"]}, targets)
    with pytest.raises(TypeError, match="int64"):
        m(outputs, [{"labels": t["labels"].float(), "boxes": t["boxes"]} for t in targets])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\] must be a float tensor of shape \(2, 4\)"):
        m(outputs, [{"labels": t["labels"], "boxes": t["boxes"][:, :2]} for t in targets])
    with pytest.raises(TypeError, match="list of dicts"):
        m(outputs, targets[0])


def test_nan_logits_are_reported():
    outputs, targets = random_case(10)
    outputs["pred_logits"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        HungarianMatcher(num_classes=3)(outputs, targets)


@pytest.mark.parametrize("kwargs", [dict(cost_class=0, cost_bbox=0, cost_giou=0), dict(cost_bbox=-1),
                                    dict(focal_alpha=1.5), dict(focal_gamma=-2), dict(cost_class="1")])
def test_invalid_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        HungarianMatcher(num_classes=3, **kwargs)


def batch_wide_reference(matcher, outputs, targets):
    """The official procedure: the batch-wide (B, Q, sum n) cost, split per image, solved per block."""
    from scipy.optimize import linear_sum_assignment

    C = matcher.cost_matrix(outputs, targets)
    blocks = C.split([len(t["labels"]) for t in targets], -1)
    return [tuple(torch.as_tensor(x, dtype=torch.int64) for x in linear_sum_assignment(c[i]))
            for i, c in enumerate(blocks)]


@given(seed=st.integers(0, 10_000), focal=st.booleans(), data=st.data())
def test_per_image_blocks_equal_batch_wide_reference(seed, focal, data):
    """forward solves only each image's (Q, n_i) block, padded to the largest n_i; the assignments
    must equal those of the batch-wide cost, for any mix of sizes (zeros included)."""
    queries = data.draw(st.integers(1, 8))
    sizes = data.draw(st.lists(st.integers(0, queries), min_size=1, max_size=4))
    outputs, targets = random_case(seed, batch=len(sizes), queries=queries, sizes=sizes, focal=focal)
    matcher = focal_or_softmax_matcher(focal)
    got = matcher(outputs, targets)
    for (i, j), (ri, rj), n in zip(got, batch_wide_reference(matcher, outputs, targets), sizes):
        assert i.dtype == j.dtype == torch.int64 and len(i) == len(j) == n
        assert torch.equal(i, ri) and torch.equal(j, rj)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("focal", [False, True])
def test_half_precision_outputs_are_matched_in_float32(dtype, focal):
    outputs, targets = random_case(11, batch=3, sizes=(2, 0, 4), focal=focal)
    half = {k: v.to(dtype) for k, v in outputs.items()}
    matcher = focal_or_softmax_matcher(focal)
    expected = matcher({k: v.float() for k, v in half.items()}, targets)
    for (i, j), (ri, rj) in zip(matcher(half, targets), expected):
        assert torch.equal(i, ri) and torch.equal(j, rj)
    assert matcher.cost_matrix(half, targets).dtype == torch.float32


@pytest.mark.parametrize("focal, num_logits, hint", [
    (False, 3, "sigmoid/focal convention"),  # focal logits (K) read by a softmax matcher
    (True, 4, "softmax convention"),  # softmax logits (K + 1) read by a focal matcher
    (False, 6, "expects 4"),
])
def test_logits_of_the_other_convention_are_rejected(focal, num_logits, hint):
    outputs, targets = random_case(12)
    outputs["pred_logits"] = torch.randn(2, 6, num_logits)
    matcher = HungarianMatcher(num_classes=3, focal_alpha=0.25 if focal else None)
    with pytest.raises(ValueError, match=hint):
        matcher(outputs, targets)
    with pytest.raises(ValueError, match=hint):
        matcher.cost_matrix(outputs, targets)


def test_num_classes_is_required_and_checked():
    with pytest.raises(TypeError, match="num_classes"):
        HungarianMatcher()
    with pytest.raises(ValueError, match="num_classes"):
        HungarianMatcher(num_classes=0)
    assert HungarianMatcher(num_classes=3).focal is False
    assert HungarianMatcher(num_classes=3, focal_alpha=0.25).focal is True

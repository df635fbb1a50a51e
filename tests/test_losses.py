"""Tests for detr_tutorial.losses: official parity, hand-computed values, focal loss, edge cases."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from detr_tutorial.losses import SetCriterion, sigmoid_focal_loss
from detr_tutorial.matcher import HungarianMatcher
from test_matcher import random_case as matcher_case

VECTORS = torch.load(Path(__file__).parent / "data" / "official_vectors.pt", weights_only=False)
LOSSES = ["labels", "boxes", "cardinality"]
K = 3  # object classes in the hand-made cases


def criterion(focal=False, eos_coef=0.1, losses=LOSSES):
    if focal:
        return SetCriterion(K, HungarianMatcher(2, 5, 2, focal_alpha=0.25), {"loss_ce": 2}, eos_coef, losses,
                            focal_alpha=0.25)
    return SetCriterion(K, HungarianMatcher(1, 5, 2), {"loss_ce": 1}, eos_coef, losses)


def random_case(seed, batch=2, queries=6, sizes=(2, 3), focal=False):
    return matcher_case(seed, batch, queries, K, sizes, focal)


def one_object_case(pred_box, logit_of_class, label=1):
    """One image, two queries; query 0 predicts ``pred_box``, query 1 is far away and says "no object"."""
    logits = torch.full((1, 2, K + 1), -5.0)
    logits[0, 0] = torch.tensor(logit_of_class)
    logits[0, 1, K] = 5.0
    boxes = torch.tensor([[pred_box, [0.9, 0.9, 0.05, 0.05]]])
    targets = [{"labels": torch.tensor([label]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


@pytest.mark.parametrize("case", range(len(VECTORS["set_criterion"]["cases"])))
def test_official_cases(case):
    ref = VECTORS["set_criterion"]
    data = ref["cases"][case]
    crit = SetCriterion(ref["num_classes"], HungarianMatcher(1, 5, 2), ref["weight_dict"], ref["eos_coef"],
                        ref["losses"])
    losses = crit(data["outputs"], data["targets"])
    assert losses.keys() == data["losses"].keys()
    for key, expected in data["losses"].items():
        torch.testing.assert_close(losses[key], expected, msg=key)


def test_empty_weight_buffer():
    crit = criterion(eos_coef=0.1)
    assert "empty_weight" in dict(crit.named_buffers())
    torch.testing.assert_close(crit.empty_weight, torch.tensor([1.0, 1.0, 1.0, 0.1]))


def test_perfect_prediction_has_zero_box_losses_and_errors():
    outputs, targets = one_object_case([0.5, 0.5, 0.2, 0.2], [-5.0, 5.0, -5.0, -5.0])
    losses = criterion()(outputs, targets)
    for key in ("loss_bbox", "loss_giou", "class_error", "cardinality_error"):
        assert losses[key].item() == pytest.approx(0.0, abs=1e-6), key


def test_shifted_box_gives_known_l1_and_giou():
    # Shift a 0.2 x 0.2 box right by 0.1: L1 = 0.1; intersection 0.02, union 0.06 = hull,
    # so IoU = GIoU = 1/3 and loss_giou = 2/3.
    outputs, targets = one_object_case([0.6, 0.5, 0.2, 0.2], [-5.0, 5.0, -5.0, -5.0])
    losses = criterion()(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.1, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(2 / 3, abs=1e-6)


def test_box_losses_are_normalised_by_number_of_targets():
    outputs, targets = random_case(1, sizes=(2, 3))
    crit = criterion()
    indices = crit.matcher(outputs, targets)
    l1 = sum((outputs["pred_boxes"][b, i] - t["boxes"][j]).abs().sum() for b, (t, (i, j)) in
             enumerate(zip(targets, indices)))
    assert crit(outputs, targets)["loss_bbox"].item() == pytest.approx(l1.item() / 5, rel=1e-6)


def test_loss_ce_is_weighted_cross_entropy_by_hand():
    outputs, targets = random_case(2)
    crit = criterion()
    indices = crit.matcher(outputs, targets)
    weight = [1.0] * K + [0.1]
    num, den = 0.0, 0.0
    for b, (i, j) in enumerate(indices):
        classes = [K] * 6
        for q, t in zip(i.tolist(), j.tolist()):
            classes[q] = targets[b]["labels"][t].item()
        logp = torch.log_softmax(outputs["pred_logits"][b].double(), -1)
        for q, c in enumerate(classes):
            num += weight[c] * -logp[q, c].item()
            den += weight[c]
    assert crit(outputs, targets)["loss_ce"].item() == pytest.approx(num / den, rel=1e-6)


def test_wrong_class_moves_only_class_terms():
    right, targets = one_object_case([0.6, 0.5, 0.2, 0.2], [-5.0, 5.0, -5.0, -5.0])
    wrong, _ = one_object_case([0.6, 0.5, 0.2, 0.2], [5.0, -5.0, -5.0, -5.0])
    a, b = criterion()(right, targets), criterion()(wrong, targets)
    assert b["loss_ce"] > a["loss_ce"] + 1 and b["class_error"].item() == 100.0 and a["class_error"].item() == 0.0
    assert b["loss_bbox"].item() == a["loss_bbox"].item() and b["loss_giou"].item() == a["loss_giou"].item()


def test_cardinality_error_counts_non_empty_predictions():
    outputs, targets = random_case(3, queries=5, sizes=(1, 2))
    logits = torch.full((2, 5, K + 1), -3.0)
    logits[0, :4, 0] = 3.0  # image 0: 4 object predictions, 1 target -> error 3
    logits[0, 4, K] = 3.0
    logits[1, :, K] = 3.0  # image 1: 0 object predictions, 2 targets -> error 2
    outputs["pred_logits"] = logits.requires_grad_()
    losses = criterion()(outputs, targets)
    assert losses["cardinality_error"].item() == pytest.approx(2.5)
    assert not losses["cardinality_error"].requires_grad and losses["loss_ce"].requires_grad


def test_images_without_objects():
    outputs, targets = random_case(4, sizes=(0, 0))
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    losses = criterion()(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    # only "no object" targets: the eos weight cancels, leaving the plain mean CE to class K
    expected = -torch.log_softmax(outputs["pred_logits"], -1)[..., K].mean()
    torch.testing.assert_close(losses["loss_ce"], expected)
    sum(losses[k] for k in ("loss_ce", "loss_bbox", "loss_giou")).backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()


def test_aux_outputs_are_matched_separately_and_suffixed():
    outputs, targets = random_case(5)
    aux = [random_case(6 + i)[0] for i in range(2)]
    crit = criterion()
    losses = crit({**outputs, "aux_outputs": aux}, targets)
    main = {"loss_ce", "class_error", "loss_bbox", "loss_giou", "cardinality_error"}
    assert losses.keys() == main | {k + s for k in main - {"class_error"} for s in ("_0", "_1")}
    for i in range(2):
        alone = crit(aux[i], targets)
        for key in main - {"class_error"}:
            torch.testing.assert_close(losses[f"{key}_{i}"], alone[key])


def focal_by_hand(logits, onehot, alpha=0.25, gamma=2.0):
    """Sum of alpha_t (1 - p_t)^gamma * (-log p_t), from the definition."""
    p = torch.sigmoid(logits.double())
    p_t = torch.where(onehot.bool(), p, 1 - p)
    alpha_t = torch.where(onehot.bool(), torch.tensor(alpha), torch.tensor(1 - alpha)).double()
    return (alpha_t * (1 - p_t) ** gamma * -torch.log(p_t)).sum()


@given(seed=st.integers(0, 10_000), alpha=st.sampled_from([0.25, 0.5]), gamma=st.sampled_from([0.0, 2.0]))
def test_sigmoid_focal_loss_formula(seed, alpha, gamma):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(2, 5, 3, generator=g)
    onehot = (torch.rand(2, 5, 3, generator=g) < 0.3).float()
    value = sigmoid_focal_loss(logits, onehot, num_boxes=4.0, alpha=alpha, gamma=gamma)
    # mean over the 5 queries, then summed, then / num_boxes
    expected = focal_by_hand(logits, onehot, alpha, gamma) / 5 / 4.0
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_focal_criterion_loss_ce_by_hand():
    outputs, targets = random_case(7, focal=True)
    crit = criterion(focal=True)
    indices = crit.matcher(outputs, targets)
    onehot = torch.zeros(2, 6, K)
    for b, (i, j) in enumerate(indices):
        onehot[b, i, targets[b]["labels"][j]] = 1.0
    losses = crit(outputs, targets)
    # summed over every (image, query, class), divided by the 5 target boxes
    assert losses["loss_ce"].item() == pytest.approx(focal_by_hand(outputs["pred_logits"], onehot).item() / 5,
                                                     rel=1e-5)
    assert losses.keys() == {"loss_ce", "class_error", "loss_bbox", "loss_giou", "cardinality_error"}


def test_focal_enc_outputs_use_class_agnostic_targets():
    outputs, targets = random_case(8, focal=True)
    enc, _ = random_case(9, queries=10, focal=True)
    crit = criterion(focal=True)
    losses = crit({**outputs, "enc_outputs": enc}, targets)
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "cardinality_error_enc"} <= losses.keys()
    assert "class_error_enc" not in losses
    binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    indices = crit.matcher(enc, binary)
    onehot = torch.zeros(2, 10, K)
    for b, (i, _) in enumerate(indices):
        onehot[b, i, 0] = 1.0  # every object is class 0
    assert losses["loss_ce_enc"].item() == pytest.approx(focal_by_hand(enc["pred_logits"], onehot).item() / 5,
                                                         rel=1e-5)


@given(seed=st.integers(0, 10_000), focal=st.booleans())
def test_losses_do_not_depend_on_query_order(seed, focal):
    outputs, targets = random_case(seed, focal=focal)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(seed + 1))
    permuted = {k: v[:, perm] for k, v in outputs.items()}
    crit = criterion(focal=focal)
    a, b = crit(outputs, targets), crit(permuted, targets)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_gradients_reach_logits_and_boxes():
    outputs, targets = random_case(10)
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    losses = criterion()(outputs, targets)
    (losses["loss_ce"] + 5 * losses["loss_bbox"] + 2 * losses["loss_giou"]).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0 and outputs["pred_boxes"].grad.abs().sum() > 0
    assert torch.isfinite(outputs["pred_boxes"].grad).all()


def test_errors():
    outputs, targets = random_case(11)
    with pytest.raises(ValueError, match=r"has 4 logits per query, expected 5"):
        SetCriterion(4, HungarianMatcher(), {}, 0.1, LOSSES)(outputs, targets)
    with pytest.raises(ValueError, match="losses must be a list"):
        SetCriterion(K, HungarianMatcher(), {}, 0.1, ["labels", "masks"])
    with pytest.raises(ValueError, match="eos_coef"):
        SetCriterion(K, HungarianMatcher(), {}, 1.5, LOSSES)
    with pytest.raises(ValueError, match="num_classes"):
        SetCriterion(0, HungarianMatcher(), {}, 0.1, LOSSES)
    with pytest.raises(ValueError, match="targets has 1 entries"):
        criterion()(outputs, targets[:1])
    small = {k: v[:, :2] for k, v in outputs.items()}
    with pytest.raises(ValueError, match=r"targets\[1\] has 3 objects.*raise num_queries"):
        criterion()(small, targets)
    with pytest.raises(ValueError, match=r"outputs\['aux_outputs'\]\[0\]: outputs has no 'pred_boxes'"):
        criterion()({**outputs, "aux_outputs": [{"pred_logits": outputs["pred_logits"]}]}, targets)
    assert math.isfinite(criterion()(outputs, targets)["loss_ce"].item())


def test_accuracy_matches_torch_topk_definition():
    outputs, targets = random_case(12)
    crit = criterion()
    indices = crit.matcher(outputs, targets)
    logits = torch.cat([outputs["pred_logits"][b, i] for b, (i, _) in enumerate(indices)])
    labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
    correct = (F.softmax(logits, -1).topk(1, -1).indices[:, 0] == labels).float().mean()
    assert crit(outputs, targets)["class_error"].item() == pytest.approx(100 * (1 - correct.item()), abs=1e-4)

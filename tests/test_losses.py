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
        return SetCriterion(K, HungarianMatcher(num_classes=K, cost_class=2, focal_alpha=0.25), {"loss_ce": 2},
                            eos_coef, losses, focal_alpha=0.25)
    return SetCriterion(K, HungarianMatcher(num_classes=K), {"loss_ce": 1}, eos_coef, losses)


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
    crit = SetCriterion(ref["num_classes"], HungarianMatcher(num_classes=ref["num_classes"]), ref["weight_dict"],
                        ref["eos_coef"], ref["losses"])
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
    with pytest.raises(ValueError, match=r"has 4 logits per query.*expects 5 for num_classes=4"):
        SetCriterion(4, HungarianMatcher(num_classes=4), {}, 0.1, LOSSES)(outputs, targets)
    with pytest.raises(ValueError, match="losses must be a list"):
        SetCriterion(K, HungarianMatcher(num_classes=K), {}, 0.1, ["labels", "masks"])
    with pytest.raises(ValueError, match="eos_coef"):
        SetCriterion(K, HungarianMatcher(num_classes=K), {}, 1.5, LOSSES)
    with pytest.raises(ValueError, match="num_classes"):
        SetCriterion(0, HungarianMatcher(num_classes=K), {}, 0.1, LOSSES)
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


@pytest.mark.parametrize("criterion_focal", [False, True])
def test_matcher_of_the_other_convention_is_rejected(criterion_focal):
    matcher = HungarianMatcher(num_classes=K, focal_alpha=None if criterion_focal else 0.25)
    with pytest.raises(ValueError, match="convention.*same focal_alpha"):
        SetCriterion(K, matcher, {}, 0.1, LOSSES, focal_alpha=0.25 if criterion_focal else None)


def test_matcher_must_agree_on_num_classes_and_be_a_hungarian_matcher():
    with pytest.raises(ValueError, match="num_classes=3 but the matcher num_classes=4"):
        SetCriterion(K, HungarianMatcher(num_classes=4), {}, 0.1, LOSSES)
    with pytest.raises(TypeError, match="HungarianMatcher"):
        SetCriterion(K, lambda outputs, targets: [], {}, 0.1, LOSSES)


@pytest.mark.parametrize("focal", [False, True])
def test_logits_of_the_other_convention_are_rejected(focal):
    outputs, targets = random_case(13, focal=not focal)  # K + 1 logits for a focal criterion, K for softmax
    with pytest.raises(ValueError, match="convention"):
        criterion(focal=focal)(outputs, targets)


@pytest.mark.parametrize("weight_dict, losses, bad", [
    ({"loss_ce": 1, "loss_gou": 2}, LOSSES, "loss_gou"),  # typo
    ({"loss_ce": 1, "loss_bbox_x": 5}, LOSSES, "loss_bbox_x"),  # unknown suffix
    ({"class_error": 1}, LOSSES, "class_error"),  # logged, not trained
    ({"cardinality_error": 1}, LOSSES, "cardinality_error"),
    ({"loss_bbox": 5}, ["labels"], "loss_bbox"),  # a term of a loss that is not computed
])
def test_unknown_weight_dict_keys_are_rejected(weight_dict, losses, bad):
    with pytest.raises(ValueError, match=f"unknown keys \\['{bad}'\\]"):
        SetCriterion(K, HungarianMatcher(num_classes=K), weight_dict, 0.1, losses)


def test_suffixed_weight_dict_keys_are_accepted_and_must_be_produced():
    weights = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}
    full = {**weights, **{f"{k}_{i}": w for k, w in weights.items() for i in (0, 1)},
            **{f"{k}_enc": w for k, w in weights.items()}}
    crit = SetCriterion(K, HungarianMatcher(num_classes=K, cost_class=2, focal_alpha=0.25), full, 0.1, LOSSES,
                        focal_alpha=0.25)
    outputs, targets = random_case(14, focal=True)
    aux = [random_case(15 + i, focal=True)[0] for i in range(2)]
    assert set(full) <= set(crit({**outputs, "aux_outputs": aux, "enc_outputs": outputs}, targets))
    # one auxiliary layer fewer than the weights name: loss_*_1 would silently never be trained
    with pytest.raises(ValueError, match=r"weight_dict names \['loss_bbox_1', 'loss_ce_1', 'loss_giou_1'\]"):
        crit({**outputs, "aux_outputs": aux[:1], "enc_outputs": outputs}, targets)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("focal", [False, True])
def test_half_precision_outputs_give_float32_losses(dtype, focal):
    outputs, targets = random_case(16, focal=focal)
    aux = [random_case(17, focal=focal)[0]]
    half = {k: v.to(dtype).requires_grad_() for k, v in outputs.items()}
    half_aux = [{k: v.to(dtype) for k, v in a.items()} for a in aux]
    crit = criterion(focal=focal)
    losses = crit({**half, "aux_outputs": half_aux}, targets)
    expected = crit({**{k: v.detach().float() for k, v in half.items()},
                     "aux_outputs": [{k: v.float() for k, v in a.items()} for a in half_aux]}, targets)
    for key, value in expected.items():
        assert losses[key].dtype == torch.float32, key
        torch.testing.assert_close(losses[key], value, rtol=0, atol=0, msg=key)
    (losses["loss_ce"] + losses["loss_bbox"] + losses["loss_giou"]).backward()
    assert half["pred_logits"].grad.dtype == dtype and torch.isfinite(half["pred_boxes"].grad.float()).all()


def test_targets_are_validated_once_per_batch(monkeypatch):
    import detr_tutorial.losses as losses_module
    import detr_tutorial.matcher as matcher_module

    calls = []
    original = losses_module.check_targets
    monkeypatch.setattr(losses_module, "check_targets", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(matcher_module, "check_targets", lambda *a, **k: calls.append(2) or original(*a, **k))
    outputs, targets = random_case(18)
    aux = [random_case(19 + i)[0] for i in range(3)]
    criterion()({**outputs, "aux_outputs": aux}, targets)
    assert calls == [1]  # once in the criterion, never again in the matcher for each of the 4 layers
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must lie in"):
        criterion()({**outputs, "aux_outputs": aux}, [{**targets[0], "labels": targets[0]["labels"] + 5},
                                                      targets[1]])


@pytest.mark.parametrize("model", ["detr", "deformable_detr"])
def test_training_builders_wire_one_convention(model):
    from detr_tutorial.postprocess import PostProcess, PostProcessTopK
    from detr_tutorial.presets import MODELS, PRESETS

    net, crit, post = MODELS[model](K, **PRESETS["tiny"].models[model])
    focal = model == "deformable_detr"
    assert crit.matcher.focal == focal and (crit.focal_alpha is not None) == focal
    assert crit.num_classes == crit.matcher.num_classes == post.num_classes == K
    assert isinstance(post, PostProcessTopK if focal else PostProcess)
    outputs = net(torch.rand(2, 3, 32, 32))
    assert outputs["pred_logits"].shape[-1] == (K if focal else K + 1)
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])
    targets = [{"labels": torch.tensor([0, 2]), "boxes": boxes}] * 2
    assert set(crit.weight_dict) <= set(crit(outputs, targets))
    assert len(post(outputs, torch.tensor([[32, 32], [32, 32]]))) == 2

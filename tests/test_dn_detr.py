"""DN-DETR (DN-DAB-DETR): official layout, eval and training outputs with denoising, the denoising loss."""
import os
import pathlib

import pytest
import torch

from detr_tutorial.losses import SetCriterion
from detr_tutorial.matcher import HungarianMatcher
from detr_tutorial.models import DNDETR, build_dn_detr
from detr_tutorial.models.dn_detr import dn_detr_losses, prepare_for_dn
from test_conditional_detr import MAKER, check_r50
from test_denoising import regenerate

DATA = pathlib.Path(__file__).parent / "data"
DN_DETR_REPO = pathlib.Path(os.environ.get("DN_DETR_REPO", "/work/.mirror/IDEA-Research+DN-DETR/repo"))


@pytest.fixture(scope="module")
def reference():
    return torch.load(DATA / "dn_detr_reference.pt", weights_only=False)


@pytest.fixture(scope="module")
def r50(reference):
    torch.manual_seed(0)
    model = build_dn_detr()
    MAKER.fill_(model, reference["seed"])
    return model


def focal_criterion(k=91):
    return SetCriterion(k, HungarianMatcher(num_classes=k, focal_alpha=0.25), {"loss_ce": 1.0}, 0.1,
                        ["labels", "boxes"], focal_alpha=0.25)


def test_r50_layout_counts_and_eval_outputs_match_official(reference):
    """Official keys and shapes (strict load), parameter count, and eval outputs to 1e-4 with the same weights."""
    torch.manual_seed(0)
    model = build_dn_detr()
    assert isinstance(model, DNDETR) and model.label_enc.weight.shape == (92, 255)
    assert (model.scalar, model.label_noise_scale, model.box_noise_scale) == (5, 0.2, 0.4)
    assert reference["dn"] == {"scalar": 5, "label_noise_scale": 0.2, "box_noise_scale": 0.4}
    check_r50(model, reference)


def test_training_outputs_with_denoising_match_official(reference, r50):
    """Training mode with the official draws (a generator seeded as the official global one): the matching
    outputs, the denoising slots' outputs and the denoising losses equal the official ones."""
    train = reference["train"]
    images, mask = MAKER.padded_batch()
    with torch.no_grad():
        out = r50.train()(images, mask, train["targets"], generator=torch.Generator().manual_seed(7))
    meta = out["dn_meta"]
    assert meta["pad_size"] == train["pad_size"] == 3 * 5 and meta["num_dn_group"] == 5
    got = MAKER.model_outputs(out)
    for key, expected in train["outputs"].items():
        torch.testing.assert_close(got[key], expected, atol=1e-4, rtol=0, msg=key)
    known = meta["output_known_lbs_bboxes"]
    torch.testing.assert_close(known["pred_logits"], train["known_logits"], atol=1e-4, rtol=0)
    boxes = torch.stack([a["pred_boxes"] for a in known["aux_outputs"]] + [known["pred_boxes"]])
    torch.testing.assert_close(boxes, train["known_boxes"], atol=1e-4, rtol=0)
    losses = dn_detr_losses(focal_criterion(), out, train["targets"])
    assert set(losses) == set(train["official_losses"])
    for key, value in losses.items():
        torch.testing.assert_close(value, train["official_losses"][key], atol=1e-4, rtol=1e-5, msg=key)


def small_model(**kwargs):
    torch.manual_seed(0)
    return build_dn_detr(num_classes=5, backbone="small", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                         dim_feedforward=64, num_queries=6, small_widths=(8, 16), small_strides=(2, 2), **kwargs)


def test_denoising_queries_do_not_change_the_matching_outputs():
    """The mask hides the denoising groups from the matching queries, so adding them leaves the matching
    outputs as they are without them; the groups cannot see each other either."""
    model = small_model().train()
    images, mask = torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.bool)
    targets = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    with torch.no_grad():
        plain = model(images, mask)
        noised = model(images, mask, targets, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noised["pred_logits"], plain["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(noised["pred_boxes"], plain["pred_boxes"], atol=1e-5, rtol=0)
    assert noised["dn_meta"]["output_known_lbs_bboxes"]["pred_logits"].shape == (2, 2 * 5, 5)


def test_batch_without_objects_trains():
    """As in the official code: no denoising slots, zero denoising losses, and a backward pass that works."""
    model = small_model().train()
    images, mask = torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.bool)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    out = model(images, mask, targets)
    assert out["dn_meta"]["pad_size"] == 0 and out["pred_logits"].shape == (2, 6, 5)
    losses = dn_detr_losses(focal_criterion(5), out, targets)
    assert len(losses) == 8 and all(v == 0 for v in losses.values())
    out["pred_logits"].sum().backward()
    assert model.label_enc.weight.grad[5].abs().sum() > 0  # the "unknown" class row starts every matching query


def test_prepare_for_dn_layout_and_errors():
    label_enc = torch.nn.Embedding(6, 7)
    targets = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    label, bbox, mask, meta = prepare_for_dn(targets, 3, 0.0, 0.0, 4, 5, 8, label_enc)
    assert meta == {"pad_size": 6, "num_dn_group": 3} and mask.shape == (10, 10)
    for g in range(3):
        torch.testing.assert_close(bbox[0, 2 * g:2 * g + 2].sigmoid(), targets[0]["boxes"])
        assert (label[:, 2 * g:2 * g + 2, -1] == torch.tensor([[1.0, 1.0], [1.0, 0.0]])).all()  # indicator
    assert mask[:2, 2:6].all() and not mask[:2, :2].any() and mask[6:, :6].all()
    with pytest.raises(ValueError, match="scalar"):
        prepare_for_dn(targets, 0, 0.2, 0.4, 4, 5, 8, label_enc)
    with pytest.raises(ValueError, match="label_noise_scale"):
        prepare_for_dn(targets, 5, 1.2, 0.4, 4, 5, 8, label_enc)
    with pytest.raises(ValueError, match="label_enc"):
        prepare_for_dn(targets, 5, 0.2, 0.4, 4, 5, 8, torch.nn.Embedding(6, 8))


def test_stored_reference_is_reproducible_from_the_clone(tmp_path, reference):
    """The generating script, re-run on the clone (skipped without it), writes the stored outputs again."""
    fresh = regenerate("make_dn_detr_reference.py", DN_DETR_REPO, tmp_path, reference)
    for key, value in reference["official"].items():
        assert torch.equal(fresh["official"][key], value), key
    for key, value in reference["train"]["official_losses"].items():
        assert torch.equal(fresh["train"]["official_losses"][key], value), key


def test_dn_loss_needs_a_focal_criterion():
    softmax = SetCriterion(5, HungarianMatcher(num_classes=5), {"loss_ce": 1.0}, 0.1, ["labels", "boxes"])
    with pytest.raises(TypeError, match="focal_alpha"):
        dn_detr_losses(softmax, {"dn_meta": None}, [])

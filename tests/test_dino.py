"""DINO-4scale: official layout and eval outputs, denoising in training, look forward twice."""
import copy
import os
import pathlib

import pytest
import torch
from conftest import load_data_script

from detr_tutorial.denoising import dn_losses
from detr_tutorial.models import DINO, build_deformable_detr, build_dino
from test_conditional_detr import MAKER
from test_denoising import regenerate
from test_dn_detr import focal_criterion

DATA = pathlib.Path(__file__).parent / "data"
DINO_REPO = pathlib.Path(os.environ.get("DINO_REPO", "/work/.mirror/IDEA-Research+DINO/repo"))
TARGETS = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
           {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]


DINO_MAKER = load_data_script("make_dino_reference")


@pytest.fixture(scope="module")
def reference():
    return torch.load(DATA / "dino_reference.pt", weights_only=False)


def eval_outputs(model, reference):
    """The stored subset (``make_dino_reference.run``) of the model's eval outputs on the stored batch, computed
    in float64 as the official ones were (float32 rounding swaps proposals whose scores differ by ~1e-6)."""
    images, mask = DINO_MAKER.dino_batch()
    with torch.no_grad():
        out = model.double().eval()(images.double(), mask)
    got = MAKER.model_outputs(out)
    got["interm_logits"] = out["interm_outputs"]["pred_logits"][:, :reference["aux_queries"]]
    got["interm_boxes"] = out["interm_outputs"]["pred_boxes"]
    got["interm_proposals"] = out["interm_outputs_for_matching_pre"]["pred_boxes"]
    return out, {k: v.float() for k, v in got.items()}


def test_r50_layout_counts_and_eval_outputs_match_official(reference):
    """Official keys and shapes (strict load), 46,893,182 parameters, eval and training outputs to 1e-4 with the
    same weights."""
    torch.manual_seed(0)
    model = build_dino()
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert dict(ours) == dict(reference["state_dict_keys"]) and len(ours) == len(reference["state_dict_keys"])
    assert sum(p.numel() for p in model.parameters()) == reference["param_counts"]["total"] == 46_893_182
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == reference["param_counts"]["trainable"]
    model.load_state_dict({k: torch.zeros(shape) for k, shape in reference["state_dict_keys"]}, strict=True)
    MAKER.fill_(model, reference["seed"])
    out, got = eval_outputs(model, reference)
    assert sorted(out) == reference["output_keys"] and out["dn_meta"] is None
    for key, expected in reference["official"].items():
        torch.testing.assert_close(got[key], expected, atol=1e-4, rtol=0, msg=key)
    check_training_outputs(model, reference["train"])


def check_training_outputs(model, case):
    """Training mode with denoising, the noise drawn from the same seeded global generator as official:
    same slots, same matching and denoising outputs (label_enc in float32, as the official code fills it)."""
    images, mask = DINO_MAKER.dino_batch()
    model.label_enc.float()
    torch.manual_seed(DINO_MAKER.TRAIN_SEED)
    with torch.no_grad():
        out = model.train()(images.double(), mask, case["targets"])
    meta, known = out["dn_meta"], out["dn_meta"]["output_known_lbs_bboxes"]
    assert (meta["pad_size"], meta["num_dn_group"]) == (case["pad_size"], case["num_dn_group"]) == (198, 33)
    got = {"pred_logits": out["pred_logits"][:, :case["pred_logits"].shape[1]], "pred_boxes": out["pred_boxes"],
           "known_logits": known["pred_logits"], "known_boxes": known["pred_boxes"]}
    for key, value in got.items():
        torch.testing.assert_close(value.float(), case[key], atol=1e-4, rtol=0, msg=key)


def small_model(**kwargs):
    torch.manual_seed(0)
    return build_dino(num_classes=5, backbone="small", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=3,
                      dim_feedforward=64, num_queries=8, dn_number=4, small_widths=(8, 16, 32),
                      small_strides=(2, 2, 2), **kwargs)


def batch():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return images, torch.zeros(2, 32, 32, dtype=torch.bool)


def test_training_with_targets_adds_denoising_outputs_of_the_official_shapes():
    """m = 2 objects, dn_number 4: 2·4 = 8 < 100 is not divided (the official quirk), so 8 groups of 2 positives
    + 2 negatives -> 32 slots in front of the 8 matching queries; the mask hides them from the matching
    queries, so those are unchanged."""
    model = small_model().train()
    images, mask = batch()
    with torch.no_grad():
        plain = model(images, mask)
        noised = model(images, mask, TARGETS, generator=torch.Generator().manual_seed(0))
    meta = noised["dn_meta"]
    assert meta["pad_size"] == 32 and meta["num_dn_group"] == 8 and plain["dn_meta"] is None
    known = meta["output_known_lbs_bboxes"]
    assert known["pred_logits"].shape == (2, 32, 5) and known["pred_boxes"].shape == (2, 32, 4)
    assert [a["pred_boxes"].shape for a in known["aux_outputs"]] == [(2, 32, 4)] * 2
    assert noised["pred_logits"].shape == (2, 8, 5) and len(noised["aux_outputs"]) == 2
    assert noised["interm_outputs"]["pred_boxes"].shape == (2, 8, 4)
    torch.testing.assert_close(noised["pred_logits"], plain["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(noised["pred_boxes"], plain["pred_boxes"], atol=1e-5, rtol=0)
    losses = dn_losses(focal_criterion(5), noised, TARGETS)  # the denoising loss reads these outputs
    assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_bbox_dn_1"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_bbox_dn"] > 0


def test_batch_without_objects_trains():
    """As in the official code: no denoising slots, and label_enc stays in the graph (zero gradient)."""
    model = small_model().train()
    images, mask = batch()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    out = model(images, mask, empty)
    assert out["dn_meta"]["pad_size"] == 0 and out["pred_logits"].shape == (2, 8, 5)
    (out["pred_logits"].sum() + out["pred_boxes"].sum() + out["interm_outputs"]["pred_logits"].sum()).backward()
    assert model.label_enc.weight.grad is not None and model.label_enc.weight.grad.abs().sum() == 0
    assert model.transformer.tgt_embed.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model(images, mask)["pred_logits"].sum().backward()  # no targets at all: no denoising queries
    assert model.label_enc.weight.grad is not None  # kept in the graph (for distributed training)


def box_head_grads(model, heads):
    """Per-layer box heads (official ``dec_pred_bbox_embed_share=False``); the gradient that the last
    layer's box loss sends to each head's last linear layer."""
    if heads is not None:
        model.bbox_embed = heads
        model.transformer.decoder.bbox_embed = heads
    images, mask = batch()
    out = model.train()(images, mask)
    out["pred_boxes"].sum().backward()
    grads = []
    for head in model.bbox_embed:
        g = head.layers[-1].weight.grad
        grads.append(0.0 if g is None else g.abs().sum().item())
    return grads


def test_look_forward_twice_against_look_forward_once():
    """DINO: the last layer predicts relative to the undetached box of the layer before, so its loss reaches
    that layer's box head. Deformable DETR with box refinement detaches it: no gradient there."""
    dino = small_model()
    heads = torch.nn.ModuleList(copy.deepcopy(dino.bbox_embed[0]) for _ in range(3))
    dino_grads = box_head_grads(dino, heads)
    assert dino_grads[2] > 0 and dino_grads[1] > 0  # its own head and, looking forward twice, the one before
    assert dino_grads[0] == 0  # layer 1 starts from layer 0's box detached: twice, not three times
    torch.manual_seed(0)
    deformable = build_deformable_detr(num_classes=5, backbone="small", hidden_dim=32, nheads=4, enc_layers=1,
                                       dec_layers=3, dim_feedforward=64, num_queries=8, small_widths=(8, 16, 32),
                                       small_strides=(2, 2, 2), with_box_refine=True)
    once = box_head_grads(deformable, None)
    assert once[2] > 0 and once[1] == 0 and once[0] == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="dn_labelbook_size"):
        small_model(dn_labelbook_size=3)
    model = small_model().train()
    images, mask = batch()
    with pytest.raises(ValueError, match="one dict per image"):
        model(images, mask, TARGETS[:1])
    assert isinstance(model, DINO)


def test_stored_reference_is_reproducible_from_the_clone(tmp_path, reference):
    """The generating script, re-run on the clone (skipped without it), writes the stored outputs again."""
    fresh = regenerate("make_dino_reference.py", DINO_REPO, tmp_path, reference)
    assert fresh["state_dict_keys"] == reference["state_dict_keys"]
    for key, value in reference["official"].items():
        assert torch.equal(fresh["official"][key], value), key
    for key in ("pred_logits", "pred_boxes", "known_logits", "known_boxes"):
        assert torch.equal(fresh["train"][key], reference["train"][key]), key

"""Contrastive denoising (DINO): official queries, mask and loss from stored outputs, and their properties."""
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from detr_tutorial.denoising import (dn_attention_mask, dn_losses, dn_positive_indices, dn_post_process,
                                     dn_weight_dict, noise_boxes, noise_labels, num_dn_groups, prepare_for_cdn)
from detr_tutorial.losses import SetCriterion
from detr_tutorial.matcher import HungarianMatcher

DATA = pathlib.Path(__file__).parent / "data"
DINO_REPO = pathlib.Path(os.environ.get("DINO_REPO", "/work/.mirror/IDEA-Research+DINO/repo"))
REFERENCE = torch.load(DATA / "dino_cdn_reference.pt", weights_only=False)
SETTINGS = REFERENCE["settings"]
CASES = REFERENCE["cases"]


def run_case(case, global_generator=False):
    """Our prepare_for_cdn on a stored case, its draws from a generator seeded as the official global one was
    (or, with ``global_generator``, from the global generator so seeded)."""
    label_enc = torch.nn.Embedding(*case["label_enc"].shape)
    with torch.no_grad():
        label_enc.weight.copy_(case["label_enc"])
    generator = None if global_generator else torch.Generator().manual_seed(case["seed"])
    if global_generator:
        torch.manual_seed(case["seed"])
    return prepare_for_cdn(case["targets"], case["dn_number"], case["label_noise_ratio"], case["box_noise_scale"],
                           SETTINGS["num_queries"], SETTINGS["num_classes"], SETTINGS["hidden_dim"], label_enc,
                           generator=generator)


def criterion():
    k = SETTINGS["num_classes"]
    return SetCriterion(k, HungarianMatcher(num_classes=k, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0,
                                                  focal_alpha=0.25),
                        {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}, 0.1,
                        ["labels", "boxes", "cardinality"], focal_alpha=0.25)


def targets_of(counts, seed=0, num_classes=20):
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, num_classes, (n,), generator=g),
             "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25,
                                 torch.rand(n, 2, generator=g) * 0.3 + 0.1], 1)} for n in counts]


# ----------------------------------------------------------------------------- official parity

@pytest.mark.parametrize("name", sorted(CASES))
def test_official_queries_and_mask(name):
    """Same group count, pad size and mask as the official code, and bit-identical noised queries
    when the draws come from a generator seeded as the official global one was."""
    case = CASES[name]
    label, bbox, mask, meta = run_case(case)
    assert meta == case["dn_meta"]
    assert mask.dtype == torch.bool and torch.equal(mask, case["attn_mask"])
    assert label.shape == case["input_query_label"].shape and bbox.shape == case["input_query_bbox"].shape
    torch.testing.assert_close(label, case["input_query_label"], rtol=0, atol=0)
    torch.testing.assert_close(bbox, case["input_query_bbox"], rtol=0, atol=0)


def test_official_draws_with_the_global_generator():
    """Without a generator the global one is used, in the official order: the same seed gives the same queries."""
    case = CASES["mixed"]
    label, bbox, _, _ = run_case(case, global_generator=True)
    assert torch.equal(label, case["input_query_label"]) and torch.equal(bbox, case["input_query_bbox"])


def test_group_counts_cover_the_official_cases():
    """The stored cases span the group-count branches: a shared budget, a budget exceeded (one group),
    a small dn_number that is not divided, dn_number 0 and a batch without objects."""
    groups = {name: case["dn_meta"]["num_dn_group"] for name, case in CASES.items()}
    assert groups == {"mixed": 33, "budget_exceeded": 1, "small_dn_number": 10, "dn_number_zero": 1,
                      "no_noise": 50, "single_image": 20, "no_objects": 1}
    for case in CASES.values():
        assert num_dn_groups(case["dn_number"], max(case["counts"])) == case["dn_meta"]["num_dn_group"]


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if "loss" in c))
def test_official_dn_loss(name):
    """dn_post_process + dn_losses on stored per-layer outputs equal the official SetCriterion's ``_dn`` terms."""
    case = CASES[name]
    meta = dict(case["dn_meta"])
    cls, coord = dn_post_process(case["loss"]["outputs_class"], case["loss"]["outputs_coord"], meta, True)
    assert cls.shape[2] == SETTINGS["num_queries"]
    outputs = {"pred_logits": cls[-1], "pred_boxes": coord[-1], "dn_meta": meta,
               "aux_outputs": [{"pred_logits": c, "pred_boxes": b} for c, b in zip(cls[:-1], coord[:-1])]}
    got, official = dn_losses(criterion(), outputs, case["targets"]), case["loss"]["official"]
    assert set(official) - set(got) == {k for k in official if k.startswith(("loss_xy", "loss_hw"))}  # logged only
    assert len(got) == 4 * SETTINGS["layers"]
    for key, value in got.items():
        torch.testing.assert_close(value, official[key], rtol=1e-6, atol=1e-6, msg=key)
    if meta["pad_size"]:
        assert got["loss_ce_dn"] > 0 and got["loss_giou_dn"] > 0


def test_every_trained_dn_term_has_the_weight_of_its_matching_term():
    """As DINO's build_dino: loss_*_dn and loss_*_dn_{i} weigh what loss_* and loss_*_{i} weigh."""
    base = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    weights = {**base, **{f"{k}_{i}": v for i in range(2) for k, v in base.items()}, "loss_ce_enc": 1.0}
    case = CASES["mixed"]
    meta = dict(case["dn_meta"])
    dn_post_process(case["loss"]["outputs_class"], case["loss"]["outputs_coord"], meta, True)
    losses = dn_losses(criterion(), {"dn_meta": meta, "aux_outputs": [{}, {}]}, case["targets"])
    trained = {k for k in losses if k.startswith("loss_")}
    assert dn_weight_dict(weights) == {k: weights[k.replace("_dn", "")] for k in trained}
    assert dn_weight_dict(weights)["loss_bbox_dn_1"] == 5.0


def test_post_process_splits_at_pad_size():
    case = CASES["mixed"]
    meta, pad = dict(case["dn_meta"]), case["dn_meta"]["pad_size"]
    c, b = case["loss"]["outputs_class"], case["loss"]["outputs_coord"]
    cls, coord = dn_post_process(c, b, meta, False)
    assert torch.equal(cls, c[:, :, pad:]) and torch.equal(coord, b[:, :, pad:])
    known = meta["output_known_lbs_bboxes"]
    assert torch.equal(known["pred_logits"], c[-1, :, :pad]) and "aux_outputs" not in known
    assert dn_post_process(c, b, None, True) == (c, b)


def regenerate(script, repo, tmp_path, stored):
    """Run the generating ``script`` on the clone ``repo`` (in a child process: it patches torch) and
    return its fresh output; skip without the clone or when it is at another commit than ``stored``."""
    if not repo.exists():
        pytest.skip(f"official repository not found at {repo} (set DINO_REPO / DN_DETR_REPO to a clone)")
    subprocess.run([sys.executable, str(DATA / script), str(repo), str(tmp_path / "fresh.pt")],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=False)
    if fresh["commit"] != stored["commit"]:
        pytest.skip(f"the clone is at {fresh['commit']}, the stored outputs come from {stored['commit']}")
    return fresh


def test_stored_reference_is_reproducible_from_the_clone(tmp_path):
    """The generating script, re-run on the clone (skipped without it), writes the stored outputs again."""
    fresh = regenerate("make_dino_cdn_reference.py", DINO_REPO, tmp_path, REFERENCE)
    for name, case in CASES.items():
        for key in ("input_query_label", "input_query_bbox", "attn_mask"):
            assert torch.equal(fresh["cases"][name][key], case[key]), (name, key)
        for key, value in case.get("loss", {}).get("official", {}).items():
            assert torch.equal(fresh["cases"][name]["loss"]["official"][key], value), (name, key)


# ----------------------------------------------------------------------------- properties

@given(m=st.integers(1, 6), groups=st.integers(1, 5), nq=st.integers(1, 5))
def test_mask_blocks_answers_and_other_groups(m, groups, nq):
    pad = 2 * m * groups
    mask = dn_attention_mask(pad, groups, nq)
    assert mask.shape == (pad + nq, pad + nq) and mask.dtype == torch.bool
    assert mask[pad:, :pad].all() and not mask[pad:, pad:].any()  # matching -> dn blocked, matching free
    assert not mask[:pad, pad:].any()  # dn queries see every matching query
    for i in range(groups):
        rows = slice(2 * m * i, 2 * m * (i + 1))
        assert not mask[rows, rows].any()  # positives and negatives of a group see each other
        for j in range(groups):
            if j != i:
                assert mask[rows, 2 * m * j:2 * m * (j + 1)].all()


@given(dn_number=st.integers(0, 300), m=st.integers(0, 400))
def test_group_count_stays_within_the_budget(dn_number, m):
    g = num_dn_groups(dn_number, m)
    assert g >= 1
    if m and 2 * dn_number >= 100 and g > 1:
        assert 2 * m * g <= 2 * dn_number < 2 * m * (g + 1)


def test_labels_are_noised_at_the_expected_rate():
    """A label is redrawn with probability p (DINO: half its label_noise_ratio), uniformly over K classes,
    so it changes with probability p · (K-1)/K. 200,000 draws: 5 standard deviations is about 0.005."""
    n, k, p = 200_000, 10, 0.25
    labels = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(0))
    noisy = noise_labels(labels, p, k, torch.Generator().manual_seed(1))
    expected = p * (k - 1) / k
    changed = (noisy != labels).float().mean().item()
    assert abs(changed - expected) < 5 * math.sqrt(expected * (1 - expected) / n)
    counts = torch.bincount(noisy[noisy != labels], minlength=k).float()
    assert counts.min() / counts.max() > 0.9  # replacements spread over all classes
    assert torch.equal(noise_labels(labels, 0.0, k), labels)


def test_box_noise_moves_corners_within_the_scale():
    """Away from the image edges (no clamping) a positive corner moves less than λ·w/2 (λ·h/2 for y),
    a negative one between λ·w/2 and 2λ·w/2."""
    n, scale = 5000, 0.4
    g = torch.Generator().manual_seed(2)
    boxes = torch.cat([torch.rand(n, 2, generator=g) * 0.2 + 0.4, torch.rand(n, 2, generator=g) * 0.2 + 0.1], 1)
    negative = torch.arange(n) % 2 == 1
    noisy = noise_boxes(boxes, negative, scale, torch.Generator().manual_seed(3))
    xyxy = lambda b: torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)  # noqa: E731
    moved = (xyxy(noisy) - xyxy(boxes)).abs() / (boxes[:, 2:].repeat(1, 2) / 2 * scale)
    eps = 1e-4
    assert moved[~negative].max() < 1 + eps and moved[negative].min() > 1 - eps and moved[negative].max() < 2 + eps
    assert moved[~negative].mean() == pytest.approx(0.5, abs=0.02)


def test_positive_slots_hold_their_targets():
    """Without noise each positive slot that dn_positive_indices names holds its target's box and label."""
    targets = targets_of((3, 0, 2), seed=4)
    label_enc = torch.nn.Embedding(21, 8)
    label, bbox, _, meta = prepare_for_cdn(targets, 100, 0.0, 0.0, 5, 20, 8, label_enc)
    assert meta == {"pad_size": 2 * 3 * 33, "num_dn_group": 33}
    for b, (slots, tgt) in enumerate(dn_positive_indices(targets, meta)):
        assert len(slots) == 33 * len(targets[b]["labels"])
        torch.testing.assert_close(bbox[b, slots].sigmoid(), targets[b]["boxes"][tgt])
        torch.testing.assert_close(label[b, slots], label_enc(targets[b]["labels"][tgt]))
        torch.testing.assert_close(label[b, slots + 3], label_enc(targets[b]["labels"][tgt]))  # the negatives
    assert (bbox[1] == 0).all() and (label[1] == 0).all()  # an image without objects: padding only


def test_batch_without_objects():
    """As in the official code: no denoising slots, one group, nothing masked, zero denoising losses."""
    label_enc = torch.nn.Embedding(21, 8)
    label, bbox, mask, meta = prepare_for_cdn(targets_of((0, 0)), 100, 0.5, 1.0, 5, 20, 8, label_enc)
    assert label.shape == (2, 0, 8) and bbox.shape == (2, 0, 4) and meta == {"pad_size": 0, "num_dn_group": 1}
    assert mask.shape == (5, 5) and not mask.any()
    c, b = torch.randn(3, 2, 5, 20), torch.rand(3, 2, 5, 4)
    assert dn_post_process(c, b, meta, True) == (c, b) and "output_known_lbs_bboxes" not in meta
    outputs = {"dn_meta": meta, "aux_outputs": [{}, {}]}
    losses = dn_losses(criterion(), outputs, targets_of((0, 0)))
    assert len(losses) == 12 and all(v == 0 for v in losses.values()) and "loss_giou_dn_1" in losses


def test_label_embedding_is_trained():
    label_enc = torch.nn.Embedding(21, 8)
    label, _, _, _ = prepare_for_cdn(targets_of((2, 1)), 10, 0.5, 1.0, 5, 20, 8, label_enc)
    label.sum().backward()
    assert label_enc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("change, message", [
    ({"dn_number": -1}, "dn_number"), ({"dn_number": 2.5}, "dn_number"),
    ({"label_noise_ratio": 1.5}, "label_noise_ratio"), ({"label_noise_ratio": -0.1}, "label_noise_ratio"),
    ({"box_noise_scale": -1.0}, "box_noise_scale"), ({"num_queries": 0}, "num_queries"),
    ({"hidden_dim": 16}, "label_enc"), ({"targets": []}, "empty batch"),
    ({"targets": [{"labels": torch.tensor([20]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]}, "labels"),
    ({"targets": [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 1.2, 0.2]])}]}, "boxes"),
])
def test_bad_inputs(change, message):
    args = dict(targets=targets_of((2,)), dn_number=100, label_noise_ratio=0.5, box_noise_scale=1.0, num_queries=5,
                num_classes=20, hidden_dim=8, label_enc=torch.nn.Embedding(21, 8))
    with pytest.raises(ValueError, match=message):
        prepare_for_cdn(**{**args, **change})


def test_mask_rejects_a_pad_size_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="pad_size"):
        dn_attention_mask(7, 2, 3)


def test_bad_types():
    with pytest.raises(TypeError, match="label_enc"):
        prepare_for_cdn(targets_of((2,)), 100, 0.5, 1.0, 5, 20, 8, torch.nn.Linear(8, 8))
    with pytest.raises(TypeError, match="criterion"):
        dn_losses(object(), {"dn_meta": None}, targets_of((2,)))

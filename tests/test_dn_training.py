"""DN-DETR and DINO trained through the library: the Trainer hands them the targets, their criteria add the
denoising terms (DN-DETR ``tgt_loss_*``, DINO ``loss_*_dn``) and DINO's ``_interm`` ones with the official weights,
and evaluation sees only the matching queries. Each test trains a few steps of the ``tiny`` preset."""
import copy
import json
import socket

import pytest
import torch
import torch.distributed as dist

from detr_tutorial import distributed, losses, train
from detr_tutorial.notebook import seed_everything
from detr_tutorial.presets import PRESETS, make_trainer
from detr_tutorial.recipes import RECIPES, DenoisingCriterion

#: model -> (its parent, how a denoising term is named, the preset's denoising settings)
MODELS = {"dn_detr": ("dab_detr", lambda k: k.startswith("tgt_loss_"), {"scalar": 5}),
          "dino": ("deformable_detr", lambda k: "_dn" in k, {"dn_number": 2, "dn_box_noise_scale": 1.0})}


def _trainer(name: str, **kwargs):
    seed_everything(0)
    return make_trainer("tiny", model=name, progress=False, **kwargs)


def _batch(trainer):
    return next(iter(trainer.train_loader))


def _dn_terms(name: str, record: dict) -> dict:
    return {k: v for k, v in record.items() if MODELS[name][1](k) and "class_error" not in k}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_steps_add_finite_denoising_terms_to_the_loss(name):
    trainer = _trainer(name)
    records = [trainer.train_step(*batch) for batch in trainer.train_loader]  # the tiny preset's 2 batches
    weights = trainer.criterion.weight_dict
    layers = trainer.model.transformer.decoder.num_layers
    for record in records:
        dn = _dn_terms(name, record)
        assert len(dn) == (3 if name == "dn_detr" else 4) * layers  # DINO's also log a cardinality error
        assert all(torch.isfinite(torch.tensor(v)) for v in dn.values())
        weighted_dn = sum(weights[k] * v for k, v in dn.items() if k in weights)
        assert weighted_dn > 0  # the targets reached the model: denoising queries were made and supervised
        total = sum(weights[k] * record[k] for k in weights)
        assert record["loss"] == pytest.approx(total, rel=1e-5)  # and their terms are part of the loss
    trained = {k for k in weights if MODELS[name][1](k)}
    assert len(trained) == 3 * layers  # class, L1 and GIoU of every decoder layer


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_denoising_terms_reach_the_gradient(name):
    """The same step with the denoising weights set to 0 updates the parameters differently."""
    steps = []
    for zero in (False, True):
        trainer = _trainer(name)
        if zero:
            trainer.criterion.weight_dict = {k: 0.0 if MODELS[name][1](k) else w
                                             for k, w in trainer.criterion.weight_dict.items()}
        images, mask, targets = _batch(trainer)
        torch.manual_seed(1)  # the same noised queries
        trainer.train_step(images, mask, targets)
        steps.append(trainer.model.class_embed.state_dict() if name == "dn_detr" else
                     trainer.model.class_embed[0].state_dict())
    assert any(not torch.equal(steps[0][k], steps[1][k]) for k in steps[0])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_batch_without_objects_trains(name):
    trainer = _trainer(name)
    images, mask, targets = _batch(trainer)
    empty = [{**t, "labels": t["labels"][:0], "boxes": t["boxes"][:0]} for t in targets]
    before = copy.deepcopy(trainer.model.state_dict())
    record = trainer.train_step(images, mask, empty)
    assert torch.isfinite(torch.tensor(record["loss"]))
    assert all(v == 0 for v in _dn_terms(name, record).values())  # no objects, no denoising queries
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_evaluation_sees_only_the_matching_queries(name):
    trainer = _trainer(name)
    images, mask, targets = _batch(trainer)
    model = trainer.model
    with torch.no_grad():
        noised = model.train()(images, mask, targets)
        model.eval()
        plain, given = model(images, mask), model(images, mask, targets)  # in eval mode the targets are unused
    assert noised["pred_logits"].shape == plain["pred_logits"].shape  # the denoising slots were split off
    assert noised["dn_meta"]["pad_size"] > 0 and not plain.get("dn_meta")
    torch.testing.assert_close(given["pred_logits"], plain["pred_logits"], rtol=0, atol=0)
    sizes = torch.tensor([[32, 32]] * len(images))
    detections = trainer.postprocess(plain, sizes)
    queries, classes = plain["pred_logits"].shape[1:]
    assert [len(d["scores"]) for d in detections] == [min(trainer.postprocess.k, queries * classes)] * len(images)


def test_recipes_have_the_official_coefficients():
    """DN-DETR: DAB-DETR's (matching 2/5/2, class loss 1, top 300) and ``tgt_`` terms weighted alike
    (``DABDETR.py:508-524``); DINO: matching 2/5/2, losses 1/5/2 also for ``_dn`` and ``_interm`` (``dino.py:757-806``)."""
    for name in MODELS:
        model, criterion, post = RECIPES[name](3, **PRESETS["tiny"].models[name])
        inner, weights = criterion.criterion, criterion.weight_dict
        assert isinstance(criterion, DenoisingCriterion) and post.k == 300 and inner.focal_alpha == 0.25
        assert (inner.matcher.cost_class, inner.matcher.cost_bbox, inner.matcher.cost_giou) == (2, 5, 2)
        last = model.transformer.decoder.num_layers - 2
        dn = ("tgt_loss_ce", "tgt_loss_bbox", "tgt_loss_giou") if name == "dn_detr" else \
            ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn")
        for key, weight in zip(("loss_ce", "loss_bbox", "loss_giou"), (1, 5, 2)):
            assert weights[key] == weights[f"{key}_{last}"] == weight
        for key, weight in zip(dn, (1, 5, 2)):
            assert weights[key] == weights[f"{key}_{last}"] == weight
    assert {k: v for k, v in weights.items() if k.endswith("_interm")} == \
        {"loss_ce_interm": 1, "loss_bbox_interm": 5, "loss_giou_interm": 2}
    assert not any(k.endswith("_enc") for k in weights)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_give_the_parents_sizes_plus_a_denoising_budget(preset):
    models = PRESETS[preset].models
    for name, (parent, _, extra) in MODELS.items():
        if parent in models:
            assert models[name] == {**models[parent], **extra}
        else:
            assert name not in models


def test_dino_without_denoising_gets_no_targets():
    trainer = _trainer("dino")
    assert trainer.model.takes_targets
    trainer.model.dn_number = 0  # as the official --use_dn off
    record = trainer.train_step(*_batch(trainer))
    assert all(v == 0 for v in _dn_terms("dino", record).values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_ddp_wrapped_model_gets_the_targets(name):
    """One gloo rank: DDP passes the targets on (the first step's terms equal those without DDP, up to the
    float32 rounding of the synchronised BatchNorm) and a second step runs (DDP checks there that every
    parameter got a gradient in the first)."""
    single, wrapped = _trainer(name), _trainer(name)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        distributed.distribute(wrapped)
        records = []
        for images, mask, targets in list(single.train_loader)[:2]:
            for trainer in (single, wrapped):
                torch.manual_seed(2)  # the same noised queries
                records.append(trainer.train_step(images, mask, targets))
                assert sum(_dn_terms(name, records[-1]).values()) > 0
    finally:
        dist.destroy_process_group()
    first, first_ddp = ({k: torch.tensor(v, dtype=torch.float32) for k, v in r.items()} for r in records[:2])
    torch.testing.assert_close(first_ddp, first)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_command_line_trains_on_tiny(name, tmp_path):
    threads = torch.get_num_threads()
    try:
        assert train.main(["--model", name, "--preset", "tiny", "--out", str(tmp_path), "--device", "cpu",
                           "--threads", "1", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    command = [json.loads(line) for line in (tmp_path / "commands.jsonl").read_text().splitlines()][-1]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert command["status"] == "finished" and command["model"] == name
    assert len(metrics) == 2 and "AP50" in metrics[-1] and _dn_terms(name, metrics[-1])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_under_ddp_the_denoising_terms_are_normalised_as_officially(name, monkeypatch):
    """Simulated ranks: when the mean object count per rank is twice this rank's, DINO divides its denoising
    terms by it, as its matching terms (official ``num_boxes * scalar``, ``dino.py`` SetCriterion.forward), so
    they halve; DN-DETR divides by this process's own number of copies (official ``compute_dn_loss``), so its
    terms stay."""
    trainer = _trainer(name)
    trainer.model.train()
    images, mask, targets = _batch(trainer)
    torch.manual_seed(2)
    outputs = trainer.model(images, mask, targets)
    alone = trainer.criterion(outputs, targets)
    monkeypatch.setattr(losses, "mean_over_ranks", lambda count: 2 * count)
    shared = trainer.criterion(outputs, targets)
    for key in ("loss_bbox", "loss_giou"):  # the matching terms halve for both models
        torch.testing.assert_close(shared[key], alone[key] / 2)
    for key, value in _dn_terms(name, alone).items():
        if "cardinality" in key:
            continue
        expected = value if name == "dn_detr" else value / 2
        torch.testing.assert_close(shared[key], expected, msg=key)

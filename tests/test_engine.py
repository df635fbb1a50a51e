"""The training engine with a tiny stand-in model and criterion (no DETR needed)."""
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from detr_tutorial.data import ShapesDataset, collate_fn
from detr_tutorial.engine import NonFiniteLossError, TrainConfig, Trainer, build_optimizer, build_scheduler
from detr_tutorial.postprocess import PostProcess


class TinyDetector(nn.Module):
    """Pooled pixels -> Q boxes and K+1 logits; has a 'backbone' submodule and dropout (uses the RNG)."""

    def __init__(self, num_queries=4, num_classes=3):
        super().__init__()
        self.backbone = nn.Conv2d(3, 8, 3, stride=4)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(8, num_queries * (num_classes + 5))
        self.q, self.k = num_queries, num_classes

    def forward(self, images, mask):
        x = self.dropout(self.backbone(images).mean((2, 3)))
        out = self.head(x).view(len(images), self.q, self.k + 5)
        return {"pred_logits": out[..., : self.k + 1], "pred_boxes": out[..., self.k + 1:].sigmoid()}


class TinyCriterion(nn.Module):
    """Box L1 to the first target box plus a 'no object' cross-entropy; optional NaN at a given call."""

    weight_dict = {"loss_bbox": 2.0, "loss_ce": 1.0}

    def __init__(self, nan_at=None):
        super().__init__()
        self.calls, self.nan_at = 0, nan_at

    def forward(self, outputs, targets):
        first = torch.stack([t["boxes"][0] for t in targets])  # (B, 4)
        loss_bbox = (outputs["pred_boxes"][:, 0] - first).abs().mean()
        logits = outputs["pred_logits"]
        loss_ce = nn.functional.cross_entropy(logits.flatten(0, 1), torch.full(logits.shape[:2], 3).flatten())
        if self.calls == self.nan_at:
            loss_bbox = loss_bbox * float("nan")
        self.calls += 1
        return {"loss_bbox": loss_bbox, "loss_ce": loss_ce, "unweighted_log": loss_ce.detach() * 0}


def _loader(n=24, batch=6):
    ds = ShapesDataset(n, image_size=32, seed=1)
    return DataLoader([ds[i] for i in range(n)], batch_size=batch, shuffle=True, collate_fn=collate_fn)


def _trainer(epochs=2, out_dir=None, criterion=None, **cfg):
    torch.manual_seed(0)
    config = TrainConfig(epochs=epochs, lr=1e-2, lr_backbone=1e-3, eval_every=0, **cfg)
    return Trainer(TinyDetector(), criterion or TinyCriterion(), _loader(), config, out_dir=out_dir, progress=False)


def test_optimizer_groups_split_the_backbone():
    model = TinyDetector()
    opt = build_optimizer(model, TrainConfig(lr=1e-3, lr_backbone=1e-5))
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert all(lrs[id(p)] == 1e-5 for p in model.backbone.parameters())
    assert all(lrs[id(p)] == 1e-3 for p in model.head.parameters())
    assert len(lrs) == len(list(model.parameters()))


def test_schedule_warms_up_then_drops():
    model = TinyDetector()
    config = TrainConfig(lr=1.0, lr_backbone=1.0, warmup_steps=4, lr_drop=2, lr_gamma=0.5)
    opt = build_optimizer(model, config)
    sched = build_scheduler(opt, config, steps_per_epoch=5)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 1, 1, 0.5, 0.5])


def test_fit_logs_steps_and_epochs_and_learns():
    trainer = _trainer(epochs=6)
    log = trainer.fit()
    assert [r["epoch"] for r in log] == list(range(6))
    assert len(trainer.step_log) == 6 * 4 and trainer.step == 24
    assert {"loss", "loss_bbox", "loss_ce", "lr", "step", "epoch"} <= set(trainer.step_log[0])
    first, last = trainer.step_log[0], trainer.step_log[-1]
    assert last["loss"] < first["loss"]
    assert first["loss"] == pytest.approx(2 * first["loss_bbox"] + first["loss_ce"])


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = _trainer(epochs=3)
    straight.fit()
    first = _trainer(epochs=1, out_dir=tmp_path)
    first.fit()
    assert (tmp_path / "checkpoint.pth").exists()
    torch.manual_seed(123)  # a resumed process starts from an unrelated RNG state
    resumed = _trainer(epochs=3)
    resumed.load_checkpoint(tmp_path / "checkpoint.pth")
    assert resumed.epoch == 1 and resumed.step == 4
    resumed.fit()
    assert [r["loss"] for r in resumed.step_log] == [r["loss"] for r in straight.step_log]
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_out_dir_gets_metrics_jsonl(tmp_path):
    _trainer(epochs=2, out_dir=tmp_path).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and records[1]["step"] == 8


def test_non_finite_loss_names_step_and_terms():
    trainer = _trainer(criterion=TinyCriterion(nan_at=5))
    with pytest.raises(NonFiniteLossError, match=r"step 5 \(epoch 1\).*loss_bbox=nan.*loss_ce=") as info:
        trainer.fit()
    assert isinstance(info.value, FloatingPointError)


def test_max_seconds_stops_early():
    trainer = _trainer(epochs=50, max_seconds=1e-9)
    log = trainer.fit()
    assert trainer.step == 1 and len(log) == 1


def test_evaluation_every_epoch():
    ds = ShapesDataset(4, image_size=32, seed=2)
    val = DataLoader([ds[i] for i in range(4)], batch_size=4, collate_fn=collate_fn)
    torch.manual_seed(0)
    trainer = Trainer(TinyDetector(), TinyCriterion(), _loader(), TrainConfig(epochs=2, eval_every=1),
                      val_loader=val, postprocess=PostProcess(num_classes=3), classes=ds.classes, progress=False)
    log = trainer.fit()
    assert all(0.0 <= r["AP50"] <= 1.0 and "AP" in r for r in log)


@pytest.mark.parametrize("kwargs, match", [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"),
                                           ({"warmup_steps": 1.5}, "warmup_steps"),
                                           ({"max_seconds": 0}, "max_seconds")])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_trainer_rejects_bad_arguments():
    with pytest.raises(TypeError, match="weight_dict"):
        Trainer(TinyDetector(), nn.Identity(), _loader(), TrainConfig(), progress=False)
    with pytest.raises(ValueError, match="postprocess"):
        Trainer(TinyDetector(), TinyCriterion(), _loader(), TrainConfig(), val_loader=_loader(), progress=False)

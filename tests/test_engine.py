"""The training engine with a tiny stand-in model and criterion (no DETR needed)."""
import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from detr_tutorial import engine, run_dir
from detr_tutorial.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from detr_tutorial.checkpoints import CheckpointMismatchError
from detr_tutorial.data import ShapesDataset, collate_fn
from detr_tutorial.engine import (NonFiniteLossError, ResumeMismatchError, TrainConfig, Trainer, build_optimizer,
                                  build_scheduler)
from detr_tutorial.postprocess import PostProcess
from detr_tutorial.presets import get_preset, make_trainer
from detr_tutorial.run_dir import CheckpointError


class TinyDetector(nn.Module):
    """Pooled pixels -> Q boxes and K+1 logits; has a 'backbone' submodule and dropout (uses the RNG)."""

    def __init__(self, num_queries=4, num_classes=3, nan_at=None):
        super().__init__()
        self.backbone = nn.Conv2d(3, 8, 3, stride=4)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(8, num_queries * (num_classes + 5))
        self.q, self.k = num_queries, num_classes
        self.calls, self.nan_at = 0, nan_at

    def forward(self, images, mask):
        x = self.dropout(self.backbone(images).mean((2, 3)))
        out = self.head(x).view(len(images), self.q, self.k + 5)
        boxes = out[..., self.k + 1:].sigmoid()
        if self.calls == self.nan_at:  # a diverged forward pass: NaN boxes in the second image
            boxes = boxes.clone()
            boxes[1] = float("nan")
        self.calls += 1
        return {"pred_logits": out[..., : self.k + 1], "pred_boxes": boxes}


class TinyCriterion(nn.Module):
    """Box L1 to the first target box plus a 'no object' cross-entropy; optional NaN at a given call."""

    weight_dict = {"loss_bbox": 2.0, "loss_ce": 1.0}

    def __init__(self, nan_at=None, nan_grad_at=None):
        super().__init__()
        self.calls, self.nan_at, self.nan_grad_at = 0, nan_at, nan_grad_at

    def forward(self, outputs, targets):
        first = torch.stack([t["boxes"][0] for t in targets])  # (B, 4)
        # like the matcher, the GIoU refuses non-finite boxes with a ValueError
        generalized_box_iou(box_cxcywh_to_xyxy(outputs["pred_boxes"][:, 0]), box_cxcywh_to_xyxy(first))
        loss_bbox = (outputs["pred_boxes"][:, 0] - first).abs().mean()
        logits = outputs["pred_logits"]
        loss_ce = nn.functional.cross_entropy(logits.flatten(0, 1), torch.full(logits.shape[:2], 3).flatten())
        if self.calls == self.nan_at:
            loss_bbox = loss_bbox * float("nan")
        if self.calls == self.nan_grad_at:  # finite value 0, gradient 0 * inf = NaN
            loss_ce = loss_ce + (logits - logits.detach()).abs().sum().sqrt()
        self.calls += 1
        return {"loss_bbox": loss_bbox, "loss_ce": loss_ce, "unweighted_log": loss_ce.detach() * 0}


def _loader(n=24, batch=6):
    ds = ShapesDataset(n, image_size=32, seed=1)
    return DataLoader([ds[i] for i in range(n)], batch_size=batch, shuffle=True, collate_fn=collate_fn)


def _trainer(epochs=2, out_dir=None, criterion=None, model=None, loader=None, run=None, progress=False, **cfg):
    torch.manual_seed(0)
    config = TrainConfig(**{"epochs": epochs, "lr": 1e-2, "lr_backbone": 1e-3, "eval_every": 0, **cfg})
    return Trainer(model or TinyDetector(), criterion or TinyCriterion(), loader or _loader(), config,
                   out_dir=out_dir, progress=progress, run=run)


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
    assert log[0]["partial"] is True  # the cut epoch says so


def test_max_seconds_is_a_budget_per_fit(tmp_path):
    """A resumed run gets its own max_seconds: the time of earlier runs does not count."""
    _trainer(epochs=1, out_dir=tmp_path).fit()
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    state["train_seconds"] = 1e6  # an earlier invocation that trained for a long time
    torch.save(state, tmp_path / "checkpoint.pth")
    resumed = _trainer(epochs=3, out_dir=tmp_path, max_seconds=1e5)
    resumed.load_checkpoint(tmp_path / "checkpoint.pth")
    log = resumed.fit()
    assert resumed.step == 12 and [r["epoch"] for r in log] == [0, 1, 2]
    assert not any("partial" in r for r in log)


class _RecordingBar(engine.tqdm):
    bars = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.closed_at = None
        _RecordingBar.bars.append(self)

    def close(self):
        if self.closed_at is None:
            self.closed_at = (self.n, self.total)
        super().close()


def test_outer_progress_bar_ends_full_and_closed(monkeypatch):
    monkeypatch.setattr(engine, "tqdm", _RecordingBar)
    _RecordingBar.bars.clear()
    _trainer(epochs=3, progress=True).fit()
    outer = [b for b in _RecordingBar.bars if b.desc == "training"]
    assert len(outer) == 1 and outer[0].closed_at == (3, 3)
    epochs = [b for b in _RecordingBar.bars if b.desc.startswith("epoch")]
    assert [b.closed_at for b in epochs] == [(4, 4)] * 3


def test_non_finite_outputs_stop_before_the_criterion():
    """NaN boxes would stop the matcher with a ValueError; the engine names the step, epoch and output."""
    trainer = _trainer(model=TinyDetector(nan_at=5))
    with pytest.raises(NonFiniteLossError, match=r"pred_boxes \(16 of 96 values\) at step 5 \(epoch 1\); "
                                                 r"the last finite loss: [0-9.]+ at step 4"):
        trainer.fit()


def test_non_finite_gradient_stops_before_the_optimizer_step():
    trainer = _trainer(criterion=TinyCriterion(nan_grad_at=2))
    batches = iter(trainer.train_loader)
    trainer.train_step(*next(batches))
    trainer.train_step(*next(batches))
    before = copy.deepcopy(trainer.model.state_dict())
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is nan at step 2 \(epoch 0\); loss terms: "
                                                 r"loss_bbox=[0-9.]+, loss_ce="):
        trainer.train_step(*next(batches))
    for k, v in trainer.model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize("model", ["detr", "deformable_detr"])
def test_diverging_models_raise_non_finite_loss_error(model):
    """A learning rate of 1e6 makes activations overflow: DETR's boxes turn NaN (the matcher would raise
    ValueError), Deformable DETR's sampling locations too (its attention raises ValueError)."""
    torch.manual_seed(0)
    preset = get_preset("tiny", lr=1e6, lr_backbone=1e6, epochs=5, eval_every=0)
    trainer = make_trainer(preset, model=model, progress=False)
    trainer.val_loader = None
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ \(epoch \d+\);.*largest \|parameter\|"):
        trainer.fit()


def test_gradients_are_clipped_to_max_norm():
    trainer = _trainer(clip_max_norm=0.1)
    trainer.model.eval()  # no dropout: the step by hand below sees the same forward pass
    images, mask, targets = next(iter(trainer.train_loader))
    reference = copy.deepcopy(trainer.model)
    loss_dict = trainer.criterion(reference(images, mask), targets)
    sum(loss_dict[k] * w for k, w in trainer.criterion.weight_dict.items()).backward()
    raw = [p.grad for p in reference.parameters()]
    raw_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw]))
    assert raw_norm > 0.5  # clipping has work to do
    trainer.train_step(images, mask, targets)
    for p, g in zip(trainer.model.parameters(), raw):  # the step leaves the clipped gradient in .grad
        torch.testing.assert_close(p.grad, g * (0.1 / raw_norm))


def test_own_checkpoint_loads_with_weights_only(tmp_path):
    _trainer(epochs=1, out_dir=tmp_path).fit()
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1 and state["run"] is None and state["steps_per_epoch"] == 4


def _ckpt(tmp_path, **kwargs):
    _trainer(**{"epochs": 1, **kwargs}, out_dir=tmp_path).fit()
    return tmp_path / "checkpoint.pth"


def test_interrupt_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    straight = _trainer(epochs=3)
    straight.fit()
    real_save, calls = torch.save, []

    def interrupted_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        data = b"PK\x03\x04 half a zip file"
        if isinstance(f, (str, bytes)) or hasattr(f, "__fspath__"):
            with open(f, "wb") as out:
                out.write(data)
        else:
            f.write(data)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        _trainer(epochs=3, out_dir=tmp_path).fit()  # Ctrl-C while saving epoch 1
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "metrics.jsonl"]  # no temp file left
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1  # the previous checkpoint, intact
    assert run_dir.read_jsonl(tmp_path / "metrics.jsonl") == state["epoch_log"]  # records never ahead of it
    resumed = _trainer(epochs=3, out_dir=tmp_path)
    resumed.load_checkpoint(tmp_path / "checkpoint.pth")
    resumed.fit()
    assert _without_time(run_dir.read_jsonl(tmp_path / "metrics.jsonl")) == _without_time(straight.epoch_log)


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in records]


def test_out_dir_with_another_run_is_refused(tmp_path):
    _ckpt(tmp_path)
    before = (tmp_path / "checkpoint.pth").read_bytes()
    with pytest.raises(FileExistsError, match="load_checkpoint"):
        _trainer(epochs=2, out_dir=tmp_path).fit()
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


def test_the_same_trainer_continues_in_its_own_out_dir(tmp_path):
    trainer = _trainer(epochs=1, out_dir=tmp_path)
    trainer.fit()
    trainer.save_checkpoint(tmp_path / "backup.pth")  # a copy elsewhere does not disown the folder
    trainer.config.epochs = 2
    trainer.fit()
    assert [r["epoch"] for r in run_dir.read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1]


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": 1e-3}, r"train\.lr is 0\.001 here but 0\.01 in the checkpoint"),
    ({"clip_max_norm": 0.0}, r"train\.clip_max_norm is 0\.0 here but 0\.1"),
    ({"epochs": 1, "max_seconds": None, "resume_epochs": 2}, r"train\.epochs is 1 here but '2 epochs already"),
    ({"loader": "larger"}, r"steps_per_epoch is 5 here but 4"),
    ({"run": {"model": "detr", "data": {"image_size": 40}}}, r"data\.image_size is 40 here but 32"),
])
def test_resume_refuses_contradicting_settings(tmp_path, kwargs, match):
    kwargs = dict(kwargs)
    path = _ckpt(tmp_path, epochs=kwargs.pop("resume_epochs", 1), run={"model": "detr", "data": {"image_size": 32}})
    if kwargs.get("loader") == "larger":
        kwargs["loader"] = _loader(n=30)
    kwargs.setdefault("run", {"model": "detr", "data": {"image_size": 32}})
    trainer = _trainer(**{"epochs": 2, **kwargs})
    before = copy.deepcopy(trainer.model.state_dict())
    with pytest.raises(ResumeMismatchError, match=match):
        trainer.load_checkpoint(path)
    assert trainer.epoch == 0 and all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_load_checkpoint_checks_everything_before_loading(tmp_path):
    path = _ckpt(tmp_path)
    trainer = _trainer(model=TinyDetector(num_queries=5))  # same backbone, other head
    before = copy.deepcopy(trainer.model.state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"head\.weight: checkpoint \(32, 8\), model \(40, 8\)"):
        trainer.load_checkpoint(path)
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.optimizer.state_dict()["state"] == {} and trainer.step == 0


def test_unreadable_checkpoints_are_named_and_explained(tmp_path):
    path = _ckpt(tmp_path)
    data = path.read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"half\.pth .*truncated or corrupt"):
        _trainer().load_checkpoint(tmp_path / "half.pth")
    model = TinyDetector().state_dict()
    for name, content in (("release.pth", {"model": model}), ("bare.pth", model)):
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=rf"{name} holds model weights only .* not a training "
                                                  r"checkpoint.*load_official_detr"):
            _trainer().load_checkpoint(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        _trainer().load_checkpoint(tmp_path / "nothing.pth")


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
                                           ({"max_seconds": 0}, "max_seconds"), ({"lr": True}, "lr")])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_schedule_rejects_empty_epochs():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_scheduler(build_optimizer(TinyDetector(), TrainConfig()), TrainConfig(), steps_per_epoch=0)


def test_trainer_rejects_bad_arguments():
    with pytest.raises(TypeError, match="weight_dict"):
        Trainer(TinyDetector(), nn.Identity(), _loader(), TrainConfig(), progress=False)
    with pytest.raises(ValueError, match="postprocess"):
        Trainer(TinyDetector(), TinyCriterion(), _loader(), TrainConfig(), val_loader=_loader(), progress=False)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        Trainer(TinyDetector, TinyCriterion(), _loader(), TrainConfig(), progress=False)
    with pytest.raises(TypeError, match="train_loader must have a len"):
        Trainer(TinyDetector(), TinyCriterion(), (b for b in _loader()), TrainConfig(), progress=False)
    with pytest.raises(TypeError, match="must be a dict as Trainer.state_dict"):
        _trainer().load_state_dict([("model", {})])

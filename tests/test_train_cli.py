"""The training CLI on the 'tiny' preset: checkpoints, metrics.jsonl, resume, devices."""
import json

import pytest
import torch

from detr_tutorial import presets, train


def _records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _run(out, *extra):
    assert train.main(["--preset", "tiny", "--out", str(out), "--device", "cpu", "--no-progress", *extra]) == 0


def test_train_writes_checkpoint_and_metrics(tmp_path):
    _run(tmp_path, "--epochs", "1")
    records = _records(tmp_path)
    assert [r["epoch"] for r in records] == [0]
    assert {"loss", "loss_ce", "loss_bbox", "loss_giou", "AP", "AP50", "step"} <= set(records[0])
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert state["epoch"] == 1 and state["step"] == records[0]["step"] > 0


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _run(straight, "--epochs", "2")
    _run(split, "--epochs", "1")
    _run(split, "--epochs", "2", "--resume", str(split / "checkpoint.pth"))
    a, b = _records(straight), _records(split)
    assert [r["epoch"] for r in b] == [0, 1]
    assert b[1]["step"] == 2 * b[0]["step"]
    assert a[1]["loss"] == b[1]["loss"] and a[1]["AP"] == b[1]["AP"]


def test_device_resolution():
    assert train.resolve_device("cpu").type == "cpu"
    assert train.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device"):
        train.resolve_device("tpu")


def test_unknown_choices_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path), "--model", "yolo"])
    with pytest.raises(ValueError, match="preset"):
        presets.get_preset("nope")


def test_models_registry_is_the_extension_point():
    assert "detr" in presets.MODELS
    model, criterion, postprocess = presets.MODELS["detr"](3, **presets.PRESETS["tiny"].models["detr"])
    out = model(torch.rand(2, 3, 32, 32))
    assert out["pred_logits"].shape[-1] == 4
    assert set(criterion(out, [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2)) \
        >= set(criterion.weight_dict)


def test_evaluating_does_not_change_the_training_run(tmp_path):
    _run(tmp_path / "often", "--epochs", "2", "--eval-every", "1")
    _run(tmp_path / "rarely", "--epochs", "2", "--eval-every", "2")
    often, rarely = _records(tmp_path / "often"), _records(tmp_path / "rarely")
    assert "AP" in often[0] and "AP" not in rarely[0]
    assert often[1]["loss"] == rarely[1]["loss"] and often[1]["AP"] == rarely[1]["AP"]

"""``python -m detr_tutorial.openmmlab.train``: a two-epoch Runner run on the tiny config, then ``--resume``."""
import json

import pytest
import torch

from detr_tutorial.openmmlab import config_path
from detr_tutorial.openmmlab.train import load_config, main, runner_checkpoint_globals

TINY = str(config_path("detr/detr_tiny.py"))


def test_two_epochs_then_resume(tmp_path):
    work = tmp_path / "work"
    runner = main([TINY, "--work-dir", str(work)])
    assert runner.epoch == 2 and runner.iter == 4  # 16 images, batches of 8
    assert (work / "detr_tiny.py").is_file()  # the dumped config
    logs = list(work.glob("*/*.log"))
    assert len(logs) == 1 and "Epoch(train) [2][2/2]" in logs[0].read_text()
    assert (work / "last_checkpoint").read_text().strip().endswith("epoch_2.pth")
    with runner_checkpoint_globals():
        checkpoint = torch.load(work / "epoch_2.pth", map_location="cpu")
    assert (checkpoint["meta"]["epoch"], checkpoint["meta"]["iter"]) == (2, 4)
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(0 <= r["coco/AP50"] <= 1 for r in records)

    resumed = main([TINY, "--work-dir", str(work), "--resume", "--cfg-options", "train_cfg.max_epochs=3"])
    assert resumed.epoch == 3 and resumed.iter == 6  # continued from epoch 2, not from scratch
    state = {k: v for k, v in checkpoint["state_dict"].items()}
    with runner_checkpoint_globals():
        last = torch.load(work / "epoch_3.pth", map_location="cpu")
    assert (last["meta"]["epoch"], last["meta"]["iter"]) == (3, 6)
    assert any(not torch.equal(last["state_dict"][k], v) for k, v in state.items())
    assert [json.loads(line)["epoch"] for line in (work / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_work_dir_and_cfg_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY, cfg_options={"train_cfg.max_epochs": 5, "model.num_queries": 4})
    assert cfg.work_dir == "./work_dirs/detr_tiny" and cfg.train_cfg.max_epochs == 5 and cfg.model.num_queries == 4
    assert load_config(TINY, work_dir="elsewhere", resume="auto").work_dir == "elsewhere"
    with pytest.raises(FileNotFoundError, match="no_such_config.py"):
        load_config("no_such_config.py")

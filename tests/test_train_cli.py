"""The training CLI on the 'tiny' preset: checkpoints, metrics.jsonl, resume, devices."""
import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from detr_tutorial import engine, presets, run_dir, train


def _records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _run(out, *extra):
    assert train.main(["--preset", "tiny", "--out", str(out), "--device", "cpu", "--no-progress", *extra]) == 0


def test_train_writes_checkpoint_and_metrics(tmp_path):
    _run(tmp_path, "--epochs", "1")
    records = _records(tmp_path)
    assert [r["epoch"] for r in records] == [0]
    assert {"loss", "loss_ce", "loss_bbox", "loss_giou", "AP", "AP50", "step"} <= set(records[0])
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == records[0]["step"] > 0


def test_commands_jsonl_records_every_invocation(tmp_path):
    data = ("--image-size", "40", "--object-size", "0.2", "0.3")
    _run(tmp_path, "--epochs", "1", *data)
    _run(tmp_path, "--epochs", "2", *data, "--resume", str(tmp_path / "checkpoint.pth"))
    first, second = [json.loads(line) for line in (tmp_path / "commands.jsonl").read_text().splitlines()]
    assert first["command"].startswith("python -m detr_tutorial.train --preset tiny")
    assert "--image-size 40" in first["command"] and "--resume" in second["command"]
    assert first["model"] == "detr" and first["preset"]["data"]["image_size"] == 40
    assert first["preset"]["data"]["object_size"] == [0.2, 0.3]
    assert second["preset"]["data"] == first["preset"]["data"] and second["preset"]["train"]["epochs"] == 2
    assert first["threads"] == torch.get_num_threads() and first["torch"] == torch.__version__
    assert first["status"] == second["status"] == "finished" and first["ended"] >= first["started"]


def _refused(capsys, out, *extra):
    with pytest.raises(SystemExit) as info:
        train.main(["--preset", "tiny", "--out", str(out), "--device", "cpu", "--no-progress", *extra])
    assert info.value.code == 2
    return capsys.readouterr().err


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_folder_with_a_run_is_kept_unless_resume_or_overwrite(tmp_path, capsys):
    _run(tmp_path, "--epochs", "1")
    before = _files(tmp_path)
    error = _refused(capsys, tmp_path, "--epochs", "2")
    assert f"--resume {tmp_path / 'checkpoint.pth'}" in error and "--overwrite" in error
    error = _refused(capsys, tmp_path, "--overwrite", "--resume", str(tmp_path / "checkpoint.pth"))
    assert "--overwrite would delete" in error
    assert _files(tmp_path) == before  # nothing written, nothing appended
    _run(tmp_path, "--epochs", "1", "--eval-every", "0", "--overwrite")
    assert [r["epoch"] for r in _records(tmp_path)] == [0]
    assert len(run_dir.read_jsonl(tmp_path / "commands.jsonl")) == 1 and "deleted" in capsys.readouterr().err
    other = tmp_path / "other"
    _run(other, "--epochs", "1")
    assert "holds another run" in _refused(capsys, other, "--resume", str(tmp_path / "checkpoint.pth"))


def test_resume_refuses_what_contradicts_the_checkpoint(tmp_path, capsys):
    _run(tmp_path, "--epochs", "2", "--eval-every", "0")
    resume = ("--resume", str(tmp_path / "checkpoint.pth"))
    error = _refused(capsys, tmp_path, "--epochs", "3", "--image-size", "40", *resume)
    assert "data.image_size: 40 from --image-size, but 32 in the checkpoint" in error
    error = _refused(capsys, tmp_path, "--epochs", "1", *resume)
    assert "train.epochs: 1 from --epochs, but '2 epochs already trained' in the checkpoint" in error
    error = _refused(capsys, tmp_path, "--model", "deformable_detr", "--epochs", "3", *resume)
    assert "model: 'deformable_detr' from --model, but 'detr' in the checkpoint" in error
    assert [r["epoch"] for r in _records(tmp_path)] == [0, 1]
    _run(tmp_path, "--epochs", "2", "--eval-every", "0", *resume)  # the same length: says so, trains nothing
    assert "nothing to train" in capsys.readouterr().err and [r["epoch"] for r in _records(tmp_path)] == [0, 1]


def test_resume_from_a_weights_file_is_explained(tmp_path, capsys):
    model, _, _ = presets.MODELS["detr"](3, **presets.PRESETS["tiny"].models["detr"])
    torch.save({"model": model.state_dict()}, tmp_path / "weights.pth")
    error = _refused(capsys, tmp_path / "run", "--resume", str(tmp_path / "weights.pth"))
    assert f"{tmp_path / 'weights.pth'} holds model weights only" in error and "not a training checkpoint" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("error, status", [(RuntimeError("boom"), "failed"), (KeyboardInterrupt(), "interrupted")])
def test_the_outcome_of_a_run_is_recorded(tmp_path, monkeypatch, error, status):
    def fail(self):
        raise error

    monkeypatch.setattr(engine.Trainer, "train_one_epoch", fail)
    with pytest.raises(type(error)):
        _run(tmp_path, "--epochs", "1")
    record = run_dir.read_jsonl(tmp_path / "commands.jsonl")[-1]
    assert record["status"] == status and record["error"] == f"{type(error).__name__}: {error}"


def test_max_seconds_stop_is_recorded(tmp_path, capsys):
    _run(tmp_path, "--epochs", "2", "--max-seconds", "1e-9", "--eval-every", "0")
    assert run_dir.read_jsonl(tmp_path / "commands.jsonl")[-1]["status"] == "stopped"
    assert _records(tmp_path)[-1]["partial"] is True and "--max-seconds" in capsys.readouterr().err


def test_commands_record_the_code_version(tmp_path, monkeypatch):
    _run(tmp_path, "--epochs", "1", "--eval-every", "0")
    code = run_dir.read_jsonl(tmp_path / "commands.jsonl")[0]["code"]
    root = Path(train.__file__).parent
    if shutil.which("git") and subprocess.run(["git", "-C", str(root), "ls-files", "--error-unmatch", "train.py"],
                                              capture_output=True).returncode == 0:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert code["commit"] == head.stdout.strip() and isinstance(code["dirty"], bool)
    else:
        assert code == {"commit": "unknown", "dirty": None}

    def no_git(*args):
        raise OSError("not a git repository")

    monkeypatch.setattr(run_dir, "_git", no_git)
    assert run_dir.code_version() == {"commit": "unknown", "dirty": None}


@pytest.mark.parametrize("args, flag", [(["--epochs", "0"], "--epochs"), (["--image-size", "-8"], "--image-size"),
                                        (["--max-seconds", "0"], "--max-seconds"), (["--seed", "-1"], "--seed"),
                                        (["--object-size", "0.5", "0.2"], "--object-size"),
                                        (["--device", "tpu"], "--device must be cpu, cuda or auto")])
def test_bad_numbers_are_rejected(tmp_path, capsys, args, flag):
    assert flag in _refused(capsys, tmp_path, *args)
    assert not tmp_path.joinpath("commands.jsonl").exists()


def test_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert "is a file, not a folder" in _refused(capsys, tmp_path / "file")


def test_data_overrides_reach_the_data(tmp_path):
    preset = presets.get_preset("tiny", data={"image_size": 40, "object_size": (0.1, 0.2)}, epochs=1)
    train_loader, val_loader, _ = presets.build_loaders(preset)
    images, mask, targets = next(iter(train_loader))
    assert images.shape[-2:] == (40, 40) and next(iter(val_loader))[0].shape[-2:] == (40, 40)
    sides = torch.cat([t["boxes"][:, 2:] for t in targets])  # normalised (w, h), a shape may be clipped
    assert sides.max() <= 0.2 + 1e-6 and sides.max() >= 0.1
    assert preset.train.epochs == 1 and presets.PRESETS["tiny"].data.image_size == 32
    with pytest.raises(ValueError, match="image_sise"):
        presets.get_preset("tiny", data={"image_sise": 40})
    with pytest.raises(ValueError, match=r"\['epoch'\] are not TrainConfig fields"):
        presets.get_preset("tiny", epoch=3)
    with pytest.raises(TypeError, match="preset must be"):
        presets.make_trainer(presets.PRESETS["tiny"].train)


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


def test_race_preset_is_fair():
    race, shapes = presets.PRESETS["race"], presets.PRESETS["shapes_cpu"]
    assert race.data == shapes.data and race.batch_size == shapes.batch_size
    assert dataclasses.replace(race.train, eval_every=shapes.train.eval_every) == shapes.train
    detr, deformable = race.models["detr"], race.models["deformable_detr"]
    backbone_keys = {"small_widths", "small_strides"}
    assert {k: v for k, v in detr.items() if k not in backbone_keys} == \
        {k: v for k, v in deformable.items() if k not in backbone_keys}
    # DETR reads the output of the same first three stages that start Deformable DETR's backbone
    assert tuple(deformable["small_widths"][:3]) == tuple(detr["small_widths"])
    assert tuple(deformable["small_strides"][:3]) == tuple(detr["small_strides"])


def test_long_race_only_stretches_the_schedule():
    race, long = presets.PRESETS["race"], presets.PRESETS["race_long"]
    assert long.data == race.data and long.batch_size == race.batch_size and long.models == race.models
    assert long.train.epochs == 3 * race.train.epochs
    # the learning rate drops at the same fraction of the schedule
    assert long.train.lr_drop / long.train.epochs == race.train.lr_drop / race.train.epochs
    assert dataclasses.replace(long.train, epochs=race.train.epochs, lr_drop=race.train.lr_drop) == race.train

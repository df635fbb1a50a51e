"""The race results that chapter 13 shows from the command line must still describe the code.

Each folder under ``book/race_runs/`` holds the ``commands.jsonl`` and ``metrics.jsonl`` that
``python -m detr_tutorial.train`` wrote. If the ``race`` or ``race_long`` preset, a model's
settings or the CLI change, these records no longer say what today's command would do, and this
test fails: rerun the commands printed in the chapter and copy the two files again.
"""
import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from detr_tutorial import presets, race_records, train
from detr_tutorial.notebook import seed_everything

RUNS = sorted(p for p in (Path(__file__).parents[1] / "book" / "race_runs").iterdir() if p.is_dir())
SHORT = race_records.SHORT_NAMES
FOUNDING = ("detr", "deformable")  # chapter 13 races these two in every setting; chapter 16 adds the others


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _settings(preset: dict, model: str) -> dict:
    """What a run of ``model`` did: everything but the description and the other models' settings (models
    that join a preset later do not change what an earlier run did). A data field added after a record was
    written is absent from it, and must then still have the default that reproduces the old code."""
    data = {f.name: json.loads(json.dumps(f.default)) for f in dataclasses.fields(presets.DataConfig)}
    return {**{k: v for k, v in preset.items() if k not in ("description", "models")},
            "data": {**data, **preset["data"]}, "model": preset["models"][model]}


def _check_provenance(record: dict) -> None:
    """Records written since the CLI records the outcome ("status") also carry the code version; older
    records have neither and are accepted as they are."""
    if "status" not in record:
        assert "code" not in record
        return
    code = record["code"]
    assert code["commit"] == "unknown" or re.fullmatch("[0-9a-f]{40}", code["commit"])
    assert code["dirty"] in ((None,) if code["commit"] == "unknown" else (True, False))


def test_new_records_carry_the_code_version(tmp_path):
    record = train.record_command(tmp_path, ["--preset", "race"], presets.get_preset("race"), "detr",
                                  torch.device("cpu"))
    assert record["status"] == "running" and "code" in record
    _check_provenance(record)
    assert train.finish_command(tmp_path, "finished")["status"] == "finished"


def test_every_setting_has_detr_and_deformable_detr():
    names = {p.name for p in RUNS}
    settings = {n.split("_", 1)[1] for n in names}
    assert len(settings) >= 2 and {f"{m}_{s}" for m in FOUNDING for s in settings} <= names
    assert all(n.split("_", 1)[0] in SHORT.values() for n in names)


def test_conditional_and_dab_detr_ran_the_small_object_race():
    names = {p.name for p in RUNS}
    assert {"conditional_128_small", "dab_128_small"} <= names


@pytest.mark.parametrize("run", RUNS, ids=lambda p: p.name)
def test_recorded_run_matches_todays_command(run):
    commands, metrics = _jsonl(run / "commands.jsonl"), _jsonl(run / "metrics.jsonl")
    argv = shlex.split(commands[-1]["command"])
    assert argv[:3] == ["python", "-m", "detr_tutorial.train"]
    args = train.parse_args(argv[3:])
    assert args.preset in ("race", "race_long") and args.model == commands[-1]["model"]
    data = {"image_size": args.image_size}
    if args.object_size is not None:
        data["object_size"] = tuple(args.object_size)
    assert run.name == Path(args.out).name and run.name.startswith(SHORT[args.model] + "_")
    preset = presets.get_preset(args.preset, data=data)
    today = _settings(json.loads(json.dumps(dataclasses.asdict(preset))), args.model)
    for record in commands:  # every invocation (first run and resumes) used today's settings
        assert _settings(record["preset"], args.model) == today
        _check_provenance(record)
    assert commands[-1].get("status", "finished") == "finished"  # the last invocation completed the run
    assert [r["epoch"] for r in metrics] == list(range(preset.train.epochs))
    assert all("AP50" in r for r in metrics)


def test_load_records_reads_every_recorded_run():
    recorded = race_records.load_records(RUNS[0].parent)
    assert sum(len(runs) for runs in recorded.values()) == len(RUNS)
    for setting, runs in recorded.items():
        for short, run in runs.items():
            metrics = _jsonl(RUNS[0].parent / f"{short}_{setting}" / "metrics.jsonl")
            assert run["AP50"].tolist() == [r["AP50"] for r in metrics]
            assert run["steps"] == metrics[-1]["step"] and len(run["seconds"]) == len(metrics)
            assert run["epoch_steps"].tolist() == [r["step"] for r in metrics]
            commands = _jsonl(RUNS[0].parent / f"{short}_{setting}" / "commands.jsonl")
            assert run["commands"] == [r["command"] for r in commands] and run["command"] == commands[-1]["command"]


def test_first_epoch_reaching_counts_from_one():
    curve = [0.0, 0.2, 0.1, 0.5]
    assert race_records.first_epoch_reaching(curve, 0.2) == 2
    assert race_records.first_epoch_reaching(curve, 0.5) == 4
    assert race_records.first_epoch_reaching(curve, 0.6) is None


def test_bad_record_folders_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder"):
        race_records.load_records(tmp_path / "absent")
    (tmp_path / "detr").mkdir()
    with pytest.raises(ValueError, match="<model>_<setting>"):
        race_records.load_records(tmp_path)
    (tmp_path / "detr").rename(tmp_path / "detr_64")
    with pytest.raises(FileNotFoundError, match="commands.jsonl"):
        race_records.load_records(tmp_path)
    (tmp_path / "detr_64" / "commands.jsonl").write_text(
        json.dumps({"command": "c", "preset": {"data": {}, "train": {"lr_drop": 1}}}) + "\n")
    (tmp_path / "detr_64" / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "step": 1, "train_seconds": 1}) + "\n")
    with pytest.raises(ValueError, match=r"epochs \[0\] were not evaluated"):
        race_records.load_records(tmp_path)


def test_live_race_is_the_seeded_command_line_run():
    torch.manual_seed(123)  # whatever the global generator holds, live_race seeds as the CLI does
    run = race_records.live_race("detr", epochs=2, preset="tiny", data={"image_size": 48})
    seed_everything(0)
    trainer = presets.make_trainer(presets.get_preset("tiny", data={"image_size": 48}, epochs=2), model="detr",
                                   progress=False)
    log = trainer.fit()
    assert run["AP50"].tolist() == [r["AP50"] for r in log] and run["AP"].tolist() == [r["AP"] for r in log]
    assert [r["loss"] for r in run["epoch_log"]] == [r["loss"] for r in log]
    assert run["epoch_steps"].tolist() == [len(trainer.train_loader), 2 * len(trainer.train_loader)]
    assert run["steps"] == trainer.step and len(run["seconds"]) == 2 and run["cpu_seconds"] > 0
    assert run["data"]["image_size"] == 48 and race_records.object_size(run) == race_records.DEFAULT_OBJECT_SIZE


def test_live_race_rejects_bad_arguments():
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        race_records.live_race("detr", epochs=0, preset="tiny")
    with pytest.raises(ValueError, match="eval_every=1"):
        race_records.live_race("detr", epochs=1, preset="shapes_cpu")
    with pytest.raises(ValueError, match="unknown model"):
        race_records.live_race("detr2", epochs=1, preset="tiny")

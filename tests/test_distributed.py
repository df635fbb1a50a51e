"""Training under torchrun: 2 CPU processes (gloo) take the steps that one process takes on the same global batch.

The 'tiny' preset trains DETR with dropout 0 on the small backbone, whose BatchNorm is trainable: the two
processes must synchronise its batch statistics (and normalise the losses over the global batch) for their
parameters to equal the single process's. One thread per process; 65-120 s on two busy cores.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from detr_tutorial import distributed, train
from detr_tutorial.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--preset", "tiny", "--device", "cpu", "--no-progress", "--threads", "1"]


def _torchrun(out: Path, *extra: str) -> str:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "detr_tutorial.train", *COMMON, "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process for 2 epochs; 2 processes for 1 epoch, then resumed for the second."""
    single, ddp = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ddp")
    threads = torch.get_num_threads()
    try:
        assert train.main([*COMMON, "--out", str(single), "--epochs", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    first = _torchrun(ddp, "--epochs", "1")
    second = _torchrun(ddp, "--epochs", "2", "--resume", str(ddp / "checkpoint.pth"))
    return {"single": single, "ddp": ddp, "stdout": [first, second]}


def _state(folder: Path) -> dict:
    return torch.load(folder / "checkpoint.pth", weights_only=True)


def test_two_processes_take_the_single_process_steps(runs):
    one, two = _state(runs["single"]), _state(runs["ddp"])
    assert one["step"] == two["step"] == 4 and one["epoch"] == two["epoch"] == 2
    assert one["model"].keys() == two["model"].keys()
    diff = max((one["model"][k].double() - two["model"][k].double()).abs().max().item() for k in one["model"])
    print(f"max |parameter difference| after {two['step']} steps: {diff:.2e}")
    for key in one["model"]:  # parameters and BatchNorm's running statistics
        torch.testing.assert_close(two["model"][key], one["model"][key], msg=lambda m, key=key: f"{key}: {m}")
    # the logged losses are the global batch's, step by step (class_error is averaged per rank)
    for a, b in zip(one["step_log"], two["step_log"], strict=True):
        assert (a["step"], a["epoch"]) == (b["step"], b["epoch"])
        torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-5, atol=0)
        torch.testing.assert_close(b["loss_bbox"], a["loss_bbox"], rtol=1e-5, atol=0)


def test_rank_zero_alone_writes_the_run_folder(runs):
    ddp = runs["ddp"]
    assert sorted(p.name for p in ddp.iterdir()) == ["checkpoint.pth", "commands.jsonl", "metrics.jsonl"]
    commands = [json.loads(line) for line in (ddp / "commands.jsonl").read_text().splitlines()]
    assert len(commands) == 2, "one record per invocation, not one per process"
    assert all(c["world_size"] == 2 and c["status"] == "finished" for c in commands)
    assert commands[0]["command"].startswith("torchrun --nnodes=1 --nproc_per_node=2 -m detr_tutorial.train")
    assert "--resume" in commands[1]["command"]
    metrics = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1] and all("AP50" in m for m in metrics)  # rank 0 evaluated
    for stdout in runs["stdout"]:  # the final record is printed once, by rank 0
        assert sum(line.startswith('{"epoch"') for line in stdout.splitlines()) == 1


def test_each_rank_gets_its_slice_of_the_single_process_batches():
    loader = DataLoader(list(range(20)), batch_size=4, shuffle=True, drop_last=True)
    torch.manual_seed(0)
    single = [[b.tolist() for b in loader] for _ in range(2)]  # two epochs
    shards = []
    for rank in range(2):
        torch.manual_seed(0)
        local = distributed.shard_loader(loader, rank, 2)
        assert len(local) == len(loader) == 5
        shards.append([[b.tolist() for b in local] for _ in range(2)])
    for epoch in range(2):
        assert [a + b for a, b in zip(shards[0][epoch], shards[1][epoch], strict=True)] == single[epoch]
    assert single[0] != single[1], "every epoch draws a new order"


def test_a_world_size_that_does_not_divide_the_batch_is_refused(tmp_path, monkeypatch, capsys):
    batch = PRESETS["tiny"].batch_size
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as info:
        train.main([*COMMON[:-2], "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    error = capsys.readouterr().err
    assert f"global batch size {batch}" in error and "world size 3" in error and "--nproc_per_node" in error
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="world size 3"):
        distributed.check_batch_split(8, 3)


def test_bad_sharding_arguments_are_refused():
    loader = DataLoader(list(range(9)), batch_size=4)
    with pytest.raises(ValueError, match="rank must be in"):
        distributed.shard_loader(loader, 2, 2)
    with pytest.raises(ValueError, match="last batch of 1 images"):
        distributed.shard_loader(loader, 0, 2)
    with pytest.raises(TypeError, match="DataLoader with a batch_size"):
        distributed.shard_loader(list(range(9)), 0, 2)

"""detr_tutorial.notebook: one-call determinism for chapters, and the chapters' conventions."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from detr_tutorial.notebook import seed_everything, setup, show_source

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


def test_setup_makes_random_streams_repeat():
    threads = torch.get_num_threads()
    try:
        setup(seed=7, threads=1)
        first = (random.random(), np.random.rand(), torch.rand(3))
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        setup(seed=7, threads=1)
        second = (random.random(), np.random.rand(), torch.rand(3))
        assert first[:2] == second[:2] and torch.equal(first[2], second[2])
        setup(seed=8, threads=1)
        assert not torch.equal(torch.rand(3), first[2])
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kwargs, message", [({"seed": -1}, "seed"), ({"threads": 0}, "threads")])
def test_setup_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        setup(**kwargs)
    with pytest.raises(ValueError, match="seed"):
        seed_everything(1.5)


def test_show_source_is_the_library_code():
    shown = show_source(seed_everything)
    assert shown.data.startswith("def seed_everything(")
    with pytest.raises(TypeError, match="show_source"):
        show_source(42)


def _toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return {c["file"] for part in toc["parts"] for c in part["chapters"]}


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_follows_the_book_conventions(path):
    nb = json.loads(path.read_text())
    assert f"book/{path.stem}" in _toc_files(), f"{path.name} is not listed in _toc.yml"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    first = "".join(code[0]["source"])
    assert "setup(" in first, f"{path.name}: the first code cell must call detr_tutorial.notebook.setup()"
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: re-run it top to bottom (make execute)"
    ignored = [c for c in code if "nbval-ignore-output" in c.get("metadata", {}).get("tags", [])]
    assert len(ignored) <= max(1, len(code) // 5), f"{path.name}: {len(ignored)} of {len(code)} cells ignored"
    for c in code:
        assert "NBVAL_" not in "".join(c["source"]), f"{path.name}: use cell tags, not NBVAL_ comments"
        for out in c.get("outputs", []):
            assert out["output_type"] != "error", f"{path.name}: stored error output"
            assert "image/svg+xml" not in out.get("data", {}), f"{path.name}: SVG figure (ids are random)"

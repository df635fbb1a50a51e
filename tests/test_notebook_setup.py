"""detr_tutorial.notebook: one-call determinism for chapters, and the chapters' conventions."""
import base64
import inspect
import json
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from detr_tutorial.notebook import seed_everything, setup, show_source

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
MAX_NOTEBOOK_BYTES = 1_000_000
MIN_FIGURE_DPI = 100
MIN_FONT_SIZE = 8
IGNORE = "nbval-ignore-output"
# Prose is about the subject, code runs on every laptop OS (the same rules as the hygiene tool
# in ../shared/tools/notebook_hygiene.py, kept here so that the check needs nothing outside the repo).
PROCESS = re.compile(r"((?:project.s|our|this book.s) issue tracker|earlier draft|we aimed|aimed for|"
                     r"the issue asks|closing note|\bTODO\b|\bFIXME\b)", re.IGNORECASE)
LINUX_ONLY = re.compile(r"(/proc/|libc\.so|ctypes\.CDLL)")
FONT_SIZE = re.compile(r"\b(?:fontsize|labelsize|titlesize)\s*=\s*(\d+(?:\.\d+)?)")


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


def _source(cell) -> str:
    return "".join(cell["source"])


def _code_cells(path):
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def _prints_text(cell) -> bool:
    return any(o["output_type"] == "stream" and o.get("name") == "stdout" or "text/plain" in o.get("data", {})
               for o in cell.get("outputs", []))


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_ignored_output_is_followed_by_its_stable_fact(path):
    """A cell whose output varies (tag nbval-ignore-output) is followed by a checked cell that prints
    what stays the same, so that nbval still compares the fact that matters."""
    cells = json.loads(path.read_text())["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code" or IGNORE not in cell.get("metadata", {}).get("tags", []):
            continue
        after = cells[i + 1] if i + 1 < len(cells) else None
        assert after is not None and after["cell_type"] == "code", \
            f"{path.name}: cell {i} is {IGNORE} and the next cell is not a code cell printing the stable fact"
        assert IGNORE not in after.get("metadata", {}).get("tags", []), \
            f"{path.name}: cell {i + 1} after ignored cell {i} is ignored too"
        assert _prints_text(after), f"{path.name}: cell {i + 1} after ignored cell {i} prints nothing"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_is_small_and_portable_and_writes_about_its_subject(path):
    size = path.stat().st_size
    assert size < MAX_NOTEBOOK_BYTES, f"{path.name} is {size / 1e6:.2f} MB: keep chapters under 1 MB"
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        text = _source(cell)
        if cell["cell_type"] == "markdown":
            hit = PROCESS.search(text)
            assert not hit, f"{path.name}: cell {i} says {hit.group(0)!r}: write about the subject"
        elif cell["cell_type"] == "code":
            hit = LINUX_ONLY.search(text)
            assert not hit, f"{path.name}: cell {i} uses {hit.group(0)!r}, which is Linux-only"
            small = [float(v) for v in FONT_SIZE.findall(text) if float(v) < MIN_FONT_SIZE]
            assert not small, f"{path.name}: cell {i} sets text size {small} pt (at least {MIN_FONT_SIZE})"


def _png_dpi(png: bytes) -> float | None:
    """Horizontal resolution from the PNG's pHYs chunk (matplotlib writes it), or None."""
    pos = 8
    while pos + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"pHYs":
            x_per_unit, _, unit = struct.unpack(">IIB", png[pos + 8:pos + 17])
            return x_per_unit * 0.0254 if unit == 1 else None
        if kind == b"IDAT":
            return None
        pos += 12 + length
    return None


def test_setup_stores_figures_at_a_legible_dpi():
    assert inspect.signature(setup).parameters["dpi"].default >= MIN_FIGURE_DPI


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_stored_figures_have_at_least_the_setup_dpi(path):
    code = _code_cells(path)
    low = []
    for i, cell in enumerate(code):
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png:
                dpi = _png_dpi(base64.b64decode("".join(png) if isinstance(png, list) else png))
                if dpi is None or round(dpi) < MIN_FIGURE_DPI:
                    low.append((i, dpi and round(dpi)))
    assert not low, f"{path.name}: figures below {MIN_FIGURE_DPI} dpi (code cell, dpi): {low}; re-run the chapter"

"""Shared test settings: deterministic torch, few threads, hypothesis profile."""
import os

import torch
from hypothesis import settings

torch.set_num_threads(int(os.environ.get("DETR_TUTORIAL_TEST_THREADS", "2")))
settings.register_profile("book", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("book")


def padded_pair(height: int, width: int, first_padded_row: int, first_padded_col: int,
                zero_padding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random images (seed 1), the second padded at the bottom and on the right:
    ``(images (2, 3, H, W), mask (2, H, W))``, mask True on padding; ``zero_padding`` zeroes those pixels."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, height, width)
    mask = torch.zeros(2, height, width, dtype=torch.bool)
    mask[1, first_padded_row:] = True
    mask[1, :, first_padded_col:] = True
    if zero_padding:
        images[mask[:, None].expand_as(images)] = 0
    return images, mask


def load_data_script(name: str):
    """``tests/data/<name>.py``, the script that made a stored reference, imported as a module (for its inputs,
    weight filler and output layout)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parent / "data" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""Shared test settings: deterministic torch, few threads, hypothesis profile."""
import os

import torch
from hypothesis import settings

torch.set_num_threads(int(os.environ.get("DETR_TUTORIAL_TEST_THREADS", "2")))
settings.register_profile("book", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("book")

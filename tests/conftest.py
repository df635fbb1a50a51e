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


# Small random transformers models, saved as save_pretrained does (tests of the hub, predict and export routes)
HF_SMALL = dict(use_timm_backbone=False, use_pretrained_backbone=False, num_queries=5, d_model=32, encoder_layers=1,
                decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=4,
                decoder_attention_heads=4, num_labels=3)
HF_RESNET18 = dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512])


def randomise(model, seed=0):
    """Redraw every tensor, BatchNorm statistics included, so that each one changes the outputs (a fresh
    model has identity BatchNorm statistics, zero-initialised box heads and nearly equal queries):
    weights ~ N(0, 1/fan_in), vectors perturbed by N(0, 0.1), running variances in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("query_position_embeddings.weight", "query_refpoint_embeddings.weight")):
                # as nn.Embedding's default: queries (DAB-DETR's anchors) far apart
                t.copy_(torch.randn(t.shape, generator=g))
            elif t.is_floating_point() and t.dim() >= 2:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    return model


def save_hf(folder, kind, resnet=HF_RESNET18, **config):
    """Build, randomise and save a small transformers model of ``kind`` (a config ``model_type``: detr,
    conditional_detr, deformable_detr, dab-detr) in ``folder``; returns it in eval mode."""
    import transformers

    torch.manual_seed(0)
    config_cls, model_cls, levels = {
        "detr": ("DetrConfig", "DetrForObjectDetection", ["stage4"]),
        "conditional_detr": ("ConditionalDetrConfig", "ConditionalDetrForObjectDetection", ["stage4"]),
        "deformable_detr": ("DeformableDetrConfig", "DeformableDetrForObjectDetection",
                            ["stage2", "stage3", "stage4"]),
        "dab-detr": ("DabDetrConfig", "DabDetrForObjectDetection", ["stage4"]),
    }[kind]
    options = {**HF_SMALL, **config}
    if kind == "dab-detr":  # transformers' DAB-DETR calls the width hidden_size
        options["hidden_size"] = options.pop("d_model")
    if kind == "deformable_detr":
        options.update(encoder_n_points=2, decoder_n_points=2)
    backbone = transformers.ResNetConfig(**resnet, out_features=levels)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(backbone_config=backbone, **options))
    randomise(model).save_pretrained(folder)
    return model.eval()


def broken_hf_folders(folder, tmp_path):
    """Copies of the transformers folder ``folder`` in ``tmp_path``, each broken in one way (no model.safetensors,
    an unsupported model_type, truncated weights): a list of (folder, regex of the error naming the file)."""
    import json
    import re

    cases = []
    for name in ("no_weights", "yolos", "truncated"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((folder / "config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "yolos" / "config.json").write_text(json.dumps({**config, "model_type": "yolos"}))
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "yolos" / "model.safetensors").write_bytes(data)
    (tmp_path / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 3])
    cases.append((tmp_path / "no_weights", re.escape(f"{tmp_path / 'no_weights' / 'model.safetensors'}: missing")))
    cases.append((tmp_path / "yolos", re.escape(f"{tmp_path / 'yolos' / 'config.json'}: model_type 'yolos' is not")))
    cases.append((tmp_path / "truncated", re.escape(f"{tmp_path / 'truncated' / 'model.safetensors'} (") +
                  r"\d+ bytes\) cannot be read as safetensors: it is truncated or corrupt"))
    return cases

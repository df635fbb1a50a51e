"""Loading checkpoints saved by Hugging Face transformers (built and saved here: nothing is downloaded)."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from conftest import HF_RESNET18, padded_pair, save_hf  # noqa: E402
from detr_tutorial.checkpoints import CheckpointMismatchError  # noqa: E402
from detr_tutorial.hub import load_hf_checkpoint  # noqa: E402
from detr_tutorial.models import DABDETR, ConditionalDETR, DeformableDETR, DETR  # noqa: E402
from detr_tutorial.run_dir import CheckpointError  # noqa: E402

def images_and_masks():
    """Two images, the second padded on the right and at the bottom: (images, book mask, transformers mask)."""
    images, padding = padded_pair(96, 128, 70, 100, zero_padding=True)
    return images, padding, (~padding).long()


def assert_same_outputs(hf_model, model):
    images, padding, pixel_mask = images_and_masks()
    with torch.no_grad():
        theirs = hf_model(pixel_values=images, pixel_mask=pixel_mask)
        ours = model.eval()(images, padding)
    torch.testing.assert_close(ours["pred_logits"], theirs.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["pred_boxes"], theirs.pred_boxes, atol=1e-5, rtol=1e-5)
    assert theirs.pred_boxes.std(dim=1).min() > 1e-3  # boxes differ between queries: the box head is exercised


TIMM_NAMES = [  # transformers ResNet -> timm's (= torchvision's) names, as facebook/detr-resnet-50 stores them
    (r"\.embedder\.embedder\.convolution\.", ".conv1."),
    (r"\.embedder\.embedder\.normalization\.", ".bn1."),
    (r"\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
     lambda m: f".layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
     lambda m: f".layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
    (r"\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.",
     lambda m: f".layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
     lambda m: f".layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
]


def as_timm_layout(src, dst, name="resnet18"):
    """Rewrite a saved folder as a transformers-4 timm-backbone checkpoint (the hub's layout):
    torchvision names under ``model.backbone.conv_encoder.model.``, ``use_timm_backbone: true``."""
    dst.mkdir()
    weights = load_file(src / "model.safetensors")
    renamed = {}
    for key, value in weights.items():
        if key.startswith("model.backbone.conv_encoder.model."):
            for pattern, replacement in TIMM_NAMES:
                key = re.sub(pattern, replacement, key)
            assert re.fullmatch(r"model\.backbone\.conv_encoder\.model\.(conv1|bn1|layer\d)\..*", key), key
        renamed[key] = value.contiguous()
    save_file(renamed, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config.update(backbone_config=None, use_timm_backbone=True, backbone=name)
    (dst / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def detr_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detr")
    return folder, save_hf(folder, "detr")


def test_detr_transformers_resnet_layout(detr_folder):
    folder, hf_model = detr_folder
    model = load_hf_checkpoint(folder)
    assert isinstance(model, DETR) and model.num_classes == 3 and model.num_queries == 5
    assert_same_outputs(hf_model, model)


def test_detr_timm_layout(detr_folder, tmp_path):
    folder, hf_model = detr_folder
    as_timm_layout(folder, tmp_path / "timm")
    assert_same_outputs(hf_model, load_hf_checkpoint(tmp_path / "timm"))


def test_detr_resnet50_both_layouts(tmp_path):
    """Bottleneck blocks (conv3, bn3, a shortcut in every stage), as in facebook/detr-resnet-50."""
    hf_model = save_hf(tmp_path / "hf", "detr", resnet={})  # transformers' default ResNet: ResNet-50
    model = load_hf_checkpoint(tmp_path / "hf")
    assert model.backbone[0].num_channels == [2048]
    assert_same_outputs(hf_model, model)
    as_timm_layout(tmp_path / "hf", tmp_path / "timm", "resnet50")
    assert_same_outputs(hf_model, load_hf_checkpoint(tmp_path / "timm"))


def test_detr_learned_position_embedding(tmp_path):
    hf_model = save_hf(tmp_path, "detr", position_embedding_type="learned")
    model = load_hf_checkpoint(tmp_path)
    assert model.backbone[1].row_embed.weight.shape == (50, 16)
    assert_same_outputs(hf_model, model)


@pytest.mark.parametrize("options", [{}, {"with_box_refine": True, "two_stage": True, "num_queries": 6,
                                          "two_stage_num_proposals": 6}])
def test_deformable_detr(tmp_path, options):
    hf_model = save_hf(tmp_path, "deformable_detr", **options)
    model = load_hf_checkpoint(tmp_path)
    assert isinstance(model, DeformableDETR) and model.two_stage == bool(options)
    assert_same_outputs(hf_model, model)


def test_conditional_detr(tmp_path):
    hf_model = save_hf(tmp_path, "conditional_detr")
    model = load_hf_checkpoint(tmp_path)
    assert isinstance(model, ConditionalDETR)
    assert_same_outputs(hf_model, model)


@pytest.mark.parametrize("options", [{}, {"random_refpoints_xy": True, "activation_function": "relu"}])
def test_dab_detr(tmp_path, options):
    """transformers' DAB-DETR (tied box heads saved once, PReLU slopes, per-block layer names) -> the book's."""
    hf_model = save_hf(tmp_path, "dab-detr", **options)
    model = load_hf_checkpoint(tmp_path)
    assert isinstance(model, DABDETR) and model.num_classes == 3
    assert model.transformer.decoder.bbox_embed is model.bbox_embed
    assert isinstance(model.transformer.encoder.layers[0].activation, torch.nn.PReLU) == (not options)
    assert_same_outputs(hf_model, model)
    if not options:  # timm's ResNet, DabDetrConfig's default backbone (use_timm_backbone=True)
        as_timm_layout(tmp_path, tmp_path / "timm")
        assert_same_outputs(hf_model, load_hf_checkpoint(tmp_path / "timm"))


def test_dab_detr_options_the_library_lacks(tmp_path):
    folder = tmp_path / "dab"
    save_hf(folder, "dab-detr", decoder_layers=1)
    for change, message in [({"keep_query_pos": True}, "keep_query_pos=True"),
                            ({"num_patterns": 3}, "num_patterns=3"),
                            ({"normalize_before": True}, "normalize_before=True"),
                            ({"temperature_width": 10}, "temperature_height=20 and temperature_width=10 differ"),
                            ({"sine_position_embedding_scale": 1.0}, "sine_position_embedding_scale=1.0"),
                            ({"activation_function": "gelu"}, "activation_function 'gelu'")]:
        bad = copy_folder(folder, tmp_path / str(len(list(tmp_path.iterdir()))), change)
        with pytest.raises(ValueError, match=re.escape(f"{bad / 'config.json'}: {message}")):
            load_hf_checkpoint(bad)


def test_missing_and_broken_files(detr_folder, tmp_path):
    folder, _ = detr_folder
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_hf_checkpoint(tmp_path / "nowhere")
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors .*truncated or corrupt"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors .*truncated or corrupt"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_hf_checkpoint(tmp_path)


def test_another_architecture(tmp_path):
    torch.manual_seed(0)
    transformers.ResNetForImageClassification(transformers.ResNetConfig(**HF_RESNET18)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'resnet' is not one the library builds"):
        load_hf_checkpoint(tmp_path)


def copy_folder(folder, dst, config_changes=None, weights_changes=None):
    dst.mkdir()
    config = json.loads((folder / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    weights = load_file(folder / "model.safetensors")
    if weights_changes:
        weights_changes(weights)
    save_file(weights, dst / "model.safetensors")
    return dst


def test_mismatched_tensors_are_named(detr_folder, tmp_path):
    folder, _ = detr_folder

    def drop_and_add(weights):
        del weights["model.decoder.layers.1.fc2.bias"]
        weights["model.decoder.layers.0.extra.weight"] = torch.zeros(3)

    bad = copy_folder(folder, tmp_path / "keys", weights_changes=drop_and_add)
    with pytest.raises(CheckpointMismatchError, match=r"model\.decoder\.layers\.0\.extra\.weight"):
        load_hf_checkpoint(bad)
    del_only = copy_folder(folder, tmp_path / "missing",
                           weights_changes=lambda w: w.pop("model.decoder.layers.1.fc2.bias"))
    missing = r"missing key\(s\): transformer\.decoder\.layers\.1\.linear2\.bias"
    with pytest.raises(CheckpointMismatchError, match=missing):
        load_hf_checkpoint(del_only)
    half_attention = copy_folder(folder, tmp_path / "qkv",
                                 weights_changes=lambda w: w.pop("model.encoder.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"model\.encoder\.layers\.0\.self_attn\.q_proj\.weight"):
        load_hf_checkpoint(half_attention)


def test_config_that_does_not_fit_the_weights(detr_folder, tmp_path):
    folder, _ = detr_folder
    queries = copy_folder(folder, tmp_path / "queries", {"num_queries": 7})
    with pytest.raises(CheckpointMismatchError, match=r"query_embed\.weight: checkpoint \(5, 32\), model \(7, 32\)"):
        load_hf_checkpoint(queries)
    heads = copy_folder(folder, tmp_path / "heads", {"decoder_attention_heads": 8})
    with pytest.raises(ValueError, match="encoder_attention_heads=4 and decoder_attention_heads=8 differ"):
        load_hf_checkpoint(heads)
    config = json.loads((folder / "config.json").read_text())
    odd_resnet = {**config["backbone_config"], "depths": [1, 1, 1, 1]}
    odd = copy_folder(folder, tmp_path / "odd", {"backbone_config": odd_resnet})
    with pytest.raises(ValueError, match=r"depths=\[1, 1, 1, 1\].* not a standard ResNet"):
        load_hf_checkpoint(odd)
    config.pop("d_model")
    copy_folder(folder, tmp_path / "no_width")
    (tmp_path / "no_width" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json has no 'd_model'"):
        load_hf_checkpoint(tmp_path / "no_width")
    gelu = copy_folder(folder, tmp_path / "gelu", {"activation_function": "gelu"})
    with pytest.raises(ValueError, match="activation_function 'gelu'"):
        load_hf_checkpoint(gelu)

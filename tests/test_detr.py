"""The DETR model: official parameter count and layout, outputs, gradients, errors."""
from pathlib import Path

import pytest
import torch
from torch import nn

from detr_tutorial.models import DETR, MLP, SmallBackbone, build_detr

VECTORS = Path(__file__).parent / "data" / "official_vectors.pt"


@pytest.fixture(scope="module")
def official():
    return torch.load(VECTORS, weights_only=False)


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return build_detr().eval()


def small(**kwargs):
    torch.manual_seed(0)
    options = dict(backbone="small", num_classes=3, hidden_dim=32, nheads=4, enc_layers=2, dec_layers=3,
                   dim_feedforward=64, num_queries=6, small_widths=(8, 16), small_strides=(2, 2))
    return build_detr(**{**options, **kwargs})


def test_official_parameter_count(r50, official):
    counts = official["detr_r50_param_counts"]
    assert sum(p.numel() for p in r50.parameters()) == counts["total"] == 41_524_768
    assert sum(p.numel() for p in r50.parameters() if p.requires_grad) == counts["trainable"] == 41_302_368


def test_official_state_dict_layout(r50, official):
    ours = [(k, tuple(v.shape)) for k, v in r50.state_dict().items()]
    assert dict(ours) == dict(official["detr_r50_state_dict_keys"])
    assert len(ours) == len(official["detr_r50_state_dict_keys"])


def test_r50_outputs(r50):
    with torch.no_grad():
        out = r50(torch.rand(1, 3, 64, 64))
    assert out["pred_logits"].shape == (1, 100, 92)
    assert out["pred_boxes"].shape == (1, 100, 4)
    assert len(out["aux_outputs"]) == 5
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()


def test_heads_and_aux_outputs_are_per_layer():
    model = small().eval()
    images = torch.rand(2, 3, 32, 40)
    out = model(images)
    assert model.class_embed.out_features == 3 + 1  # num_classes + "no object"
    assert [tuple(a["pred_logits"].shape) for a in out["aux_outputs"]] == [(2, 6, 4)] * 2
    # aux outputs are the heads applied to the earlier decoder layers
    src, mask = model.backbone(images)[0][-1]
    pos = model.backbone[1](mask)
    hs = model.transformer(model.input_proj(src), mask, model.query_embed.weight, pos)[0]
    torch.testing.assert_close(out["aux_outputs"][0]["pred_logits"], model.class_embed(hs[0]))
    torch.testing.assert_close(out["aux_outputs"][1]["pred_boxes"], model.bbox_embed(hs[1]).sigmoid())
    torch.testing.assert_close(out["pred_logits"], model.class_embed(hs[2]))
    assert "aux_outputs" not in small(aux_loss=False)(images)


def test_mask_none_means_no_padding():
    model = small().eval()
    images = torch.rand(2, 3, 32, 32)
    a = model(images)
    b = model(images, torch.zeros(2, 32, 32, dtype=torch.bool))
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    mask[1, 16:] = True
    c = model(images, mask)
    torch.testing.assert_close(c["pred_boxes"][0], a["pred_boxes"][0])
    assert not torch.allclose(c["pred_boxes"][1], a["pred_boxes"][1])


def test_gradients_reach_every_trainable_parameter():
    model = small(position_embedding="learned").train()
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    mask[0, :, 20:] = True
    with torch.no_grad():  # zero-initialised biases take non-zero values after one step
        for name, p in model.named_parameters():
            if name.endswith("in_proj_bias"):
                p.normal_()
    out = model(torch.rand(2, 3, 32, 32), mask)
    layers = [out] + out["aux_outputs"]
    loss = sum(o["pred_logits"].logsumexp(-1).sum() + o["pred_boxes"].square().sum() for o in layers)
    loss.backward()
    # the first decoder self-attention sees zero inputs (see test_transformer)
    dead = "transformer.decoder.layers.0.self_attn.in_proj_weight"
    for name, p in model.named_parameters():
        if name != dead:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_custom_backbone_module():
    model = build_detr(SmallBackbone((8, 16, 24), (2, 2, 1)), num_classes=5, hidden_dim=16, nheads=2,
                       enc_layers=1, dec_layers=1, dim_feedforward=32, num_queries=4)
    assert isinstance(model, DETR) and model.input_proj.in_channels == 24
    assert model(torch.rand(1, 3, 16, 16))["pred_logits"].shape == (1, 4, 6)


def test_mlp():
    mlp = MLP(4, 8, 2, 3)
    assert [tuple(m.weight.shape) for m in mlp.layers] == [(8, 4), (8, 8), (2, 8)]
    x = torch.randn(5, 4)
    expected = mlp.layers[2](torch.relu(mlp.layers[1](torch.relu(mlp.layers[0](x)))))
    torch.testing.assert_close(mlp(x), expected)


def test_errors():
    model = small()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="match images"):
        model(torch.rand(1, 3, 32, 32), torch.zeros(1, 32, 16, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        model(torch.rand(1, 3, 32, 32), torch.zeros(1, 32, 32))
    with pytest.raises(TypeError, match="pad_images"):
        model([torch.rand(3, 32, 32)])
    with pytest.raises(ValueError, match="backbone"):
        build_detr("resnet200")
    with pytest.raises(TypeError, match="backbone"):
        build_detr(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="position_embedding"):
        small(position_embedding="rope")
    with pytest.raises(ValueError, match="num_classes"):
        small(num_classes=0)

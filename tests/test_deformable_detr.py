"""Deformable DETR: transformer pieces, the model, its options and the training builder."""
import math
import re
import warnings

import pytest
import torch

from detr_tutorial.models import DeformableDETR, build_deformable_detr
from detr_tutorial.models.deformable_transformer import (DeformableTransformer, DeformableTransformerEncoder,
                                                         inverse_sigmoid, valid_ratios)
from test_ms_deform_attn import load_official_module, official_module, official_source

SMALL = dict(backbone="small", num_classes=3, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
             dim_feedforward=64, num_queries=10, small_widths=(8, 16, 32), dropout=0.0)


def images_and_mask():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 24, generator=g)
    mask = torch.zeros(2, 32, 24, dtype=torch.bool)
    mask[1, :, 16:] = True  # second image is 28x16, padded to 32x24
    mask[1, 28:, :] = True
    return images, mask


def test_inverse_sigmoid_and_valid_ratios():
    x = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])
    torch.testing.assert_close(inverse_sigmoid(x)[1:4].sigmoid(), x[1:4])
    assert inverse_sigmoid(x)[0] == math.log(1e-5 / 1) and inverse_sigmoid(x)[-1] == -math.log(1e-5)
    mask = torch.zeros(2, 4, 8, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 6:] = True
    torch.testing.assert_close(valid_ratios(mask), torch.tensor([[1.0, 1.0], [0.75, 0.75]]))


def test_encoder_reference_points_are_valid_pixel_centres():
    shapes = torch.tensor([[4, 8], [2, 4]])
    ratios = torch.tensor([[[0.75, 0.5], [0.75, 0.5]]])  # (B, L, 2) as (w, h)
    ref = DeformableTransformerEncoder.get_reference_points(shapes, ratios)
    assert ref.shape == (1, 32 + 8, 2, 2)
    # pixel (row 0, column 0) of level 0: centre (0.5/8, 0.5/4) of the map, then / valid ratio * ratio
    torch.testing.assert_close(ref[0, 0, 0], torch.tensor([0.5 / 8, 0.5 / 4]))
    # the last valid column of level 0 (x index 5 of 8; 6 valid) has its centre 5.5/6 of the way
    torch.testing.assert_close(ref[0, 5, 0, 0] / 0.75, torch.tensor(5.5 / 6))
    # the same point seen from level 1 has the same normalised position (equal ratios)
    torch.testing.assert_close(ref[:, :, 0], ref[:, :, 1])


@pytest.mark.parametrize("options", [{}, {"with_box_refine": True},
                                     {"with_box_refine": True, "two_stage": True}])
def test_forward_shapes_and_gradients(options):
    torch.manual_seed(0)
    model = build_deformable_detr(**SMALL, **options)
    assert isinstance(model, DeformableDETR)
    images, mask = images_and_mask()
    out = model(images, mask)
    assert out["pred_logits"].shape == (2, 10, 3) and out["pred_boxes"].shape == (2, 10, 4)
    assert len(out["aux_outputs"]) == 1 and out["aux_outputs"][0]["pred_boxes"].shape == (2, 10, 4)
    assert ("enc_outputs" in out) == bool(options.get("two_stage"))
    ref_dims = [r.shape[-1] for r in out["references"]]
    assert ref_dims == ([4, 4, 4] if options.get("two_stage") else
                        [2, 4, 4] if options.get("with_box_refine") else [2, 2, 2])
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    # zero-initialised layers block gradients at step 0; perturb them, then every parameter learns
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(std=0.05)
    out = model(images, mask)
    loss = out["pred_logits"].sigmoid().sum() + out["pred_boxes"].sum()
    loss = loss + sum(a["pred_boxes"].sum() + a["pred_logits"].sum() for a in out["aux_outputs"])
    if "enc_outputs" in out:
        loss = loss + out["enc_outputs"]["pred_logits"].sum() + out["enc_outputs"]["pred_boxes"].sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing


def test_official_initialisation_and_defaults():
    torch.manual_seed(0)
    model = build_deformable_detr(**SMALL)
    assert model.class_embed[0] is model.class_embed[1]  # shared heads without refinement
    torch.testing.assert_close(model.class_embed[0].bias.sigmoid(), torch.full((3,), 0.01))
    last = model.bbox_embed[0].layers[-1]
    assert last.weight.abs().max() == 0 and last.bias.tolist() == [0.0, 0.0, -2.0, -2.0]
    assert model.query_embed.weight.shape == (10, 64)  # position | content
    assert [type(p[0]).__name__ for p in model.input_proj] == ["Conv2d"] * 4
    assert model.input_proj[3][0].stride == (2, 2) and model.input_proj[3][0].kernel_size == (3, 3)
    assert all(p[1].num_groups == 32 for p in model.input_proj)  # 32 divides 32
    # a zero box head puts every first-layer box centre on the query's reference point
    out = model(*images_and_mask())
    torch.testing.assert_close(out["aux_outputs"][0]["pred_boxes"][..., :2], out["references"][0])
    refine = build_deformable_detr(**SMALL, with_box_refine=True)
    assert refine.class_embed[0] is not refine.class_embed[1]
    assert refine.bbox_embed[0].layers[-1].bias.tolist() == [0.0, 0.0, -2.0, -2.0]
    assert refine.bbox_embed[1].layers[-1].bias.abs().max() == 0
    two = build_deformable_detr(**SMALL, with_box_refine=True, two_stage=True)
    assert len(two.class_embed) == 3 and not hasattr(two, "query_embed")
    assert all(h.layers[-1].bias.abs().max() == 0 for h in two.bbox_embed)
    # official defaults: 4 levels, 8 heads, 4 points, 300 queries, FFN 1024, 6 + 6 layers, d 256
    t = DeformableTransformer()
    assert (t.d_model, t.nhead, t.two_stage_num_proposals) == (256, 8, 300)
    assert (t.encoder.num_layers, t.decoder.num_layers) == (6, 6)
    layer = t.encoder.layers[0]
    assert layer.linear1.out_features == 1024 and layer.dropout1.p == 0.1
    assert (layer.self_attn.n_levels, layer.self_attn.n_heads, layer.self_attn.n_points) == (4, 8, 4)


def test_group_norm_groups_divide_small_hidden_dims():
    model = build_deformable_detr(**dict(SMALL, hidden_dim=24, nheads=4))
    assert all(p[1].num_groups == 8 for p in model.input_proj)  # gcd(32, 24)
    assert model(*images_and_mask())["pred_boxes"].shape == (2, 10, 4)


def test_padding_does_not_change_the_image_content_result():
    """An image alone and the same image padded in a batch give the same detections (the untrained
    backbone's BatchNorm keeps padded pixels at zero, like convolution padding; the transformer
    must then ignore the padding through masks and valid ratios)."""
    torch.manual_seed(0)
    model = build_deformable_detr(**SMALL).eval()
    images, mask = images_and_mask()
    alone = model(images[1:, :, :28, :16])
    padded = model(images[1:], mask[1:])
    torch.testing.assert_close(padded["pred_boxes"], alone["pred_boxes"], rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="two_stage"):
        build_deformable_detr(**SMALL, two_stage=True)
    with pytest.raises(ValueError, match="backbone"):
        build_deformable_detr(**dict(SMALL, backbone="vgg"))
    with pytest.raises(ValueError, match="num_queries"):
        build_deformable_detr(**dict(SMALL, num_queries=0))
    with pytest.raises(ValueError, match="query_embed"):
        DeformableTransformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1)(
            [torch.randn(1, 32, 4, 4)] * 4, [torch.zeros(1, 4, 4, dtype=torch.bool)] * 4,
            [torch.randn(1, 32, 4, 4)] * 4)


def load_official_transformer():
    """The official DeformableTransformer (pure-PyTorch attention core), from the local mirror."""
    official_attn = load_official_module()

    misc = official_source("util/misc.py")
    inv = re.search(r"def inverse_sigmoid\(.*?\n(?:    .*\n)+", misc).group(0)
    src = official_source("models/deformable_transformer.py")
    src = src.replace("from util.misc import inverse_sigmoid", inv).replace(
        "from models.ops.modules import MSDeformAttn", "")
    return official_module("official_deformable_transformer", src, MSDeformAttn=official_attn).DeformableTransformer


@pytest.mark.parametrize("refine", [False, True])
def test_transformer_parity_with_official(refine):
    official_cls = load_official_transformer()
    kwargs = dict(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                  dropout=0.0, num_feature_levels=3, dec_n_points=2, enc_n_points=3)
    torch.manual_seed(0)
    official = official_cls(return_intermediate_dec=True, **kwargs)
    ours = DeformableTransformer(**kwargs)
    for p in official.parameters():  # away from the init, so every path matters
        torch.nn.init.normal_(p, std=0.2)
    ours.load_state_dict(official.state_dict())
    if refine:
        heads = torch.nn.ModuleList(torch.nn.Linear(32, 4) for _ in range(2))
        official.decoder.bbox_embed = heads
        ours.decoder.bbox_embed = heads
    g = torch.Generator().manual_seed(1)
    shapes = [(8, 6), (4, 3), (2, 2)]
    srcs = [torch.randn(2, 32, h, w, generator=g) for h, w in shapes]
    pos = [torch.randn(2, 32, h, w, generator=g) for h, w in shapes]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in shapes]
    masks[0][1, 6:, :] = True
    masks[1][1, 3:, :] = True
    query = torch.randn(7, 64, generator=g)
    with warnings.catch_warnings():  # their meshgrid call warns about its indexing argument
        warnings.simplefilter("ignore")
        expected = official(srcs, masks, pos, query)
    got = ours(srcs, masks, pos, query)
    for a, b in zip(got[:3], expected[:3]):
        torch.testing.assert_close(a, b)

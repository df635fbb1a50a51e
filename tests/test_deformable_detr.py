"""Deformable DETR: transformer pieces, the model, its options and the training builder."""
import functools
import importlib.util
import math
import pathlib
import re
import types
import warnings

import pytest
import torch

from detr_tutorial.models import DeformableDETR, build_deformable_detr
from detr_tutorial.models.deformable_transformer import (DeformableTransformer, DeformableTransformerEncoder,
                                                         inverse_sigmoid, valid_ratios)
from detr_tutorial.models.position_encoding import PositionEmbeddingSine
from test_ms_deform_attn import OFFICIAL_REPO, load_official_module, official_module, official_source

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


def test_transformer_ignores_padding():
    """Maps padded with random values give the decoder outputs of the unpadded maps: the padding mask
    keeps padded tokens out of every attention and the valid ratios (different per level here) put
    every reference point on the same pixels. (The whole model is not padding-invariant: GroupNorm in
    ``input_proj`` takes its statistics over the padded map, as in the official code.)"""
    torch.manual_seed(0)
    t = DeformableTransformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                              dim_feedforward=64, dropout=0.0, num_feature_levels=3, dec_n_points=2,
                              enc_n_points=2).eval()
    t.decoder.bbox_embed = torch.nn.ModuleList(torch.nn.Linear(32, 4) for _ in range(2))  # box references
    position = PositionEmbeddingSine(16, normalize=True, offset=-0.5)
    g = torch.Generator().manual_seed(1)
    alone, padded = ([], [], []), ([], [], [])
    for (h, w), (big_h, big_w) in zip([(8, 6), (4, 3), (2, 2)], [(10, 8), (5, 4), (3, 3)]):
        src = torch.randn(1, 32, big_h, big_w, generator=g)
        mask = torch.ones(1, big_h, big_w, dtype=torch.bool)
        mask[:, :h, :w] = False
        for store, s, m in ((alone, src[..., :h, :w], mask[:, :h, :w]), (padded, src, mask)):
            store[0].append(s)
            store[1].append(m)
            store[2].append(position(m))
    query = torch.randn(7, 64, generator=g)
    with torch.no_grad():
        expected, got = t(*alone, query), t(*padded, query)
    for a, b in zip(got[:3], expected[:3]):  # hs, initial and per-layer references
        torch.testing.assert_close(a, b)


def test_refinement_detaches_the_reference_between_layers():
    """With box refinement, layer l's predictions send no gradient into layer l-1's box head: the box
    layer l-1 hands on as reference is detached (official ``new_reference_points.detach()``)."""
    torch.manual_seed(0)
    model = build_deformable_detr(**SMALL, with_box_refine=True)
    with torch.no_grad():
        for head in model.bbox_embed:  # zero-initialised last layers would block every gradient
            head.layers[-1].weight.normal_(std=0.1)
    out = model(*images_and_mask())
    last_layer = out["pred_boxes"].sum() + out["pred_logits"].sum()
    first_head = list(model.bbox_embed[0].parameters())
    grads = torch.autograd.grad(last_layer, first_head + list(model.bbox_embed[1].parameters()),
                                retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads[:len(first_head)])
    assert all(g is not None and g.abs().max() > 0 for g in grads[len(first_head):])
    # layer 0's own boxes do train its head
    grads = torch.autograd.grad(out["aux_outputs"][0]["pred_boxes"].sum(), first_head)
    assert all(g.abs().max() > 0 for g in grads)


def test_small_and_fully_padded_inputs_raise():
    model = build_deformable_detr(**SMALL).eval()  # hidden 32: GroupNorm(32, 32), one channel per group
    with pytest.raises(ValueError, match="16x16 pixels are too small.*larger than 16 pixels"):
        model(torch.rand(1, 3, 16, 16))
    assert model(torch.rand(1, 3, 17, 16))["pred_boxes"].shape == (1, 10, 4)  # level 3 is 2x1
    images, mask = images_and_mask()
    mask[1] = True
    with pytest.raises(ValueError, match="image 1 of the batch as fully padded"):
        model(images, mask)
    wide = build_deformable_detr(**dict(SMALL, hidden_dim=64))  # GroupNorm(32, 64): 1x1 maps are fine
    assert wide.eval()(torch.rand(1, 3, 16, 16))["pred_boxes"].shape == (1, 10, 4)


REFERENCE = pathlib.Path(__file__).parent / "data" / "deformable_reference.pt"


@functools.cache
def official_reference():
    """Official outputs written by ``tests/data/make_deformable_reference.py`` (it names the commit)."""
    return torch.load(REFERENCE)


def test_reference_data_names_its_source():
    ref = official_reference()
    assert re.fullmatch(r"[0-9a-f]{40}", ref["commit"]) and ref["repository"].endswith("/Deformable-DETR")
    assert (pathlib.Path(__file__).parent.parent / ref["script"]).exists()


@pytest.mark.parametrize("refine", [False, True])
def test_transformer_matches_stored_official_outputs(refine):
    case = official_reference()["transformer"]
    ours = DeformableTransformer(**case["kwargs"]).eval()
    ours.load_state_dict(case["state_dict"], strict=True)
    if refine:
        ours.decoder.bbox_embed = torch.nn.ModuleList(torch.nn.Linear(32, 4) for _ in range(2))
        ours.decoder.bbox_embed.load_state_dict(case["heads"], strict=True)
    ours.double()
    with torch.no_grad():
        hs, init_ref, inter_refs, _, _ = ours([s.double() for s in case["srcs"]], case["masks"],
                                              [p.double() for p in case["pos"]], case["query_embed"].double())
    expected = case["refine" if refine else "plain"]
    torch.testing.assert_close(hs, expected["hs"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(init_ref, expected["init_reference"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inter_refs, expected["inter_references"], rtol=1e-10, atol=1e-10)


def test_encoder_proposals_match_stored_official_outputs():
    """``gen_encoder_output_proposals``: size 0.05 * 2^level, valid range 0.01 < p < 0.99 on all four
    coordinates, inverse sigmoid, inf on padding and out-of-range proposals, memory zeroed there."""
    case = official_reference()["proposals"]
    t = DeformableTransformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                              num_feature_levels=6, two_stage=True)
    t.enc_output.load_state_dict({k[11:]: v for k, v in case["heads"].items() if k.startswith("enc_output.")})
    t.enc_output_norm.load_state_dict({k[16:]: v for k, v in case["heads"].items()
                                       if k.startswith("enc_output_norm.")})
    t.double()
    with torch.no_grad():
        memory, proposals = t.encoder_proposals(case["memory"], case["mask_flatten"], case["spatial_shapes"])
    expected = case["output_proposals"]
    invalid = expected.isinf()
    assert invalid.any(-1).sum() > 0 and (~invalid).all(-1).sum() > 0  # the case holds both kinds
    torch.testing.assert_close(proposals, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(memory, case["output_memory"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", ["plain", "with_box_refine", "two_stage"])
def test_model_matches_stored_official_outputs(variant):
    """The official DeformableDETR's weights load with ``strict=True`` and give the same predictions
    (final, every auxiliary layer and, two-stage, the encoder's) on a padded batch, in float64."""
    ref = official_reference()
    case = ref["models"][variant]
    ours = build_deformable_detr(**ref["config"], **case["options"]).eval()
    ours.load_state_dict(case["state_dict"], strict=True)
    ours.double()
    with torch.no_grad():
        out = ours(ref["images"].double(), ref["mask"])
    expected = case["outputs"]
    assert len(out["aux_outputs"]) == len(expected["aux_outputs"]) == ref["config"]["dec_layers"] - 1
    keys = ["pred_logits", "pred_boxes"]
    pairs = [(out, expected)] + list(zip(out["aux_outputs"], expected["aux_outputs"]))
    if variant == "two_stage":
        pairs.append((out["enc_outputs"], expected["enc_outputs"]))
    else:
        assert "enc_outputs" not in out
    for got, want in pairs:
        for k in keys:
            torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-10)


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


def _official_misc():
    """The official ``util/misc.py`` (its torchvision version check patched to a version it accepts)."""
    src = official_source("util/misc.py").replace("torchvision.__version__[:3]", "'0.8'")
    return official_module("official_misc", src)


def load_official_transformer():
    """The official DeformableTransformer (pure-PyTorch attention core), from the local mirror.

    One run-time patch: ``get_proposal_pos_embed`` hard-codes 128 channels per box coordinate
    (= d_model / 2 for the official d_model 256); it is made ``d_model // 2`` so that two-stage
    runs at a small hidden size, as the library does for every ``d_model``."""
    official_attn = load_official_module()
    src = official_source("models/deformable_transformer.py")
    src = src.replace("from util.misc import inverse_sigmoid", "").replace(
        "from models.ops.modules import MSDeformAttn", "").replace(
        "num_pos_feats = 128", "num_pos_feats = self.d_model // 2")
    return official_module("official_deformable_transformer", src, MSDeformAttn=official_attn,
                           inverse_sigmoid=_official_misc().inverse_sigmoid).DeformableTransformer


def load_official_detr():
    """The official ``DeformableDETR``, ``Joiner``, ``PositionEmbeddingSine``, ``NestedTensor`` and
    ``nested_tensor_from_tensor_list``, executed from the local mirror with their imports stripped."""
    misc = _official_misc()
    names = {k: getattr(misc, k) for k in ("NestedTensor", "nested_tensor_from_tensor_list", "accuracy",
                                           "get_world_size", "interpolate", "is_dist_avail_and_initialized",
                                           "inverse_sigmoid")}
    src = official_source("models/position_encoding.py").replace("from util.misc import NestedTensor", "")
    position = official_module("official_position_encoding", src, NestedTensor=misc.NestedTensor)
    src = official_source("models/backbone.py").replace(
        "from util.misc import NestedTensor, is_main_process", "").replace(
        "from .position_encoding import build_position_encoding", "")
    backbone = official_module("official_backbone", src, NestedTensor=misc.NestedTensor)
    src = official_source("models/deformable_detr.py")
    src = src[:src.index("from util import box_ops")] + src[src.index("import copy"):]  # relative imports
    detr = official_module("official_deformable_detr", src, **names)
    return types.SimpleNamespace(DeformableDETR=detr.DeformableDETR, Joiner=backbone.Joiner,
                                 PositionEmbeddingSine=position.PositionEmbeddingSine,
                                 DeformableTransformer=load_official_transformer(), **names)


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


def test_stored_reference_is_reproducible_from_the_clone(tmp_path, monkeypatch):
    """The generating script, re-run on the clone (skipped without it), writes the stored outputs again."""
    load_official_module()  # skips without the clone
    monkeypatch.setenv("DEFORMABLE_DETR_REPO", str(OFFICIAL_REPO))  # the script sets it; restored afterwards
    spec = importlib.util.spec_from_file_location("make_deformable_reference", REFERENCE.parent /
                                                  "make_deformable_reference.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(OFFICIAL_REPO, tmp_path / "fresh.pt")
    fresh, stored = torch.load(tmp_path / "fresh.pt"), official_reference()
    if fresh["commit"] != stored["commit"]:
        pytest.skip(f"the clone is at {fresh['commit']}, the stored outputs come from {stored['commit']}")
    torch.testing.assert_close(fresh["proposals"]["output_proposals"], stored["proposals"]["output_proposals"])
    for name, case in stored["models"].items():
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(fresh["models"][name]["outputs"][key], case["outputs"][key])

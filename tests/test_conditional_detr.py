"""Conditional DETR: official layout and outputs, the sine embedding of points, the conditional layer, errors."""
import os
import pathlib
import subprocess

import pytest
import torch
from conftest import load_data_script

from detr_tutorial.models import (ConditionalDecoderLayer, ConditionalDETR, ProjectionFreeAttention,
                                  build_conditional_detr, sine_embed_points)
from detr_tutorial.models.conditional_detr import ConditionalDecoder
from test_ms_deform_attn import official_module

DATA = pathlib.Path(__file__).parent / "data"
# Clones (bare is fine) of the official repositories; the live parity tests read their code at test
# time and skip when absent. Their outputs on fixed cases are stored in DATA/conditional_dab_vectors.pt
# by DATA/make_conditional_dab_vectors.py, so parity is checked without them too.
CONDITIONAL_REPO = pathlib.Path(os.environ.get("CONDITIONAL_DETR_REPO", "/work/.mirror/Atten4Vis+ConditionalDETR/repo"))


MAKER = load_data_script("make_conditional_dab_vectors")


@pytest.fixture(scope="module")
def vectors():
    return torch.load(DATA / "conditional_dab_vectors.pt", weights_only=False)


def batch_first(inputs):
    """The stored layer inputs are sequence-first (L, B, d), as official; the library is batch-first."""
    return {k: v.transpose(0, 1) if v.dim() == 3 else v for k, v in inputs.items()}


def check_r50(model, case):
    """Same keys and shapes as the official model, same parameter counts, same outputs with the same weights."""
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert dict(ours) == dict(case["state_dict_keys"]) and len(ours) == len(case["state_dict_keys"])
    assert sum(p.numel() for p in model.parameters()) == case["param_counts"]["total"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == case["param_counts"]["trainable"]
    checkpoint = {k: torch.zeros(shape) for k, shape in case["state_dict_keys"]}  # an official checkpoint's layout
    model.load_state_dict(checkpoint, strict=True)
    MAKER.fill_(model, case["seed"])
    images, mask = MAKER.padded_batch()
    with torch.no_grad():
        got = MAKER.model_outputs(model.eval()(images, mask))
    for key, expected in case["official"].items():
        torch.testing.assert_close(got[key], expected, atol=1e-4, rtol=0, msg=key)


def official_source(repo, path):
    """The text of ``path`` at HEAD of the clone ``repo``; skips the test when the clone is absent."""
    if not repo.exists():
        pytest.skip(f"official repository not found at {repo} (set CONDITIONAL_DETR_REPO / DAB_DETR_REPO "
                    "to a clone to run the live parity tests)")
    return subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout


def official_attention(repo, path):
    """The official attention module without input projections, its old-torch imports renamed."""
    src = official_source(repo, path).replace(
        "from torch.nn.modules.linear import _LinearWithBias",
        "from torch.nn.modules.linear import NonDynamicallyQuantizableLinear as _LinearWithBias").replace(
        "from torch._overrides import", "from torch.overrides import")
    return official_module(f"official_attention_{repo.name}", src)


def load_official_conditional():
    attention = official_attention(CONDITIONAL_REPO, "models/attention.py")
    src = official_source(CONDITIONAL_REPO, "models/transformer.py").replace(
        "from .attention import MultiheadAttention", "")
    return official_module("official_conditional_transformer", src,
                           MultiheadAttention=attention.MultiheadAttention)


def commit_of(repo):
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def small(**kwargs):
    torch.manual_seed(0)
    options = dict(backbone="small", num_classes=3, hidden_dim=32, nheads=4, enc_layers=2, dec_layers=3,
                   dim_feedforward=64, num_queries=6, small_widths=(8, 16), small_strides=(2, 2), dropout=0.0)
    return build_conditional_detr(**{**options, **kwargs})


# ----------------------------------------------------------------------------- stored official outputs

def test_stored_vectors_record_their_source(vectors):
    assert vectors["conditional"]["commit"] == "8ea7c3f3fff49cd287855d4f13cc12a6066bc8e9"
    if CONDITIONAL_REPO.exists():  # regenerate the vectors when the clone moves on
        assert commit_of(CONDITIONAL_REPO) == vectors["conditional"]["commit"]


def test_sine_embedding_matches_official(vectors):
    case = vectors["conditional"]["sine_embed"]
    torch.testing.assert_close(sine_embed_points(case["points_2d"]), case["official_2d"])


@pytest.mark.parametrize("first", [True, False])
def test_conditional_layer_matches_official(vectors, first):
    case = vectors["conditional"]["cond_layer"]
    layer = ConditionalDecoderLayer(256, 8, 64, dropout=0.0).eval()
    MAKER.fill_(layer, MAKER.SEED + 1)
    if not first:
        layer.ca_qpos_proj = None
    x = batch_first(case["inputs"])
    got = layer(x["tgt"], x["memory"], x["query_pos"], x["query_sine_embed"], x["memory_key_padding_mask"], x["pos"])
    expected = case["official_first" if first else "official_later"].transpose(0, 1)
    torch.testing.assert_close(got, expected)


def test_r50_layout_counts_and_outputs_match_official(vectors):
    torch.manual_seed(0)
    model = build_conditional_detr()
    assert sum(p.numel() for p in model.parameters()) == 43_418_401
    assert model.num_queries == vectors["conditional"]["cond_r50"]["num_queries"] == 300
    check_r50(model, vectors["conditional"]["cond_r50"])


# ----------------------------------------------------------------------------- live official code

def test_sine_embedding_and_layer_match_live_official_code():
    official = load_official_conditional()
    g = torch.Generator().manual_seed(11)
    points = torch.rand(9, 3, 2, generator=g)
    torch.testing.assert_close(sine_embed_points(points), official.gen_sineembed_for_position(points))
    theirs = official.TransformerDecoderLayer(256, 8, 128, dropout=0.0).eval()
    ours = ConditionalDecoderLayer(256, 8, 128, dropout=0.0).eval()
    MAKER.fill_(theirs, 12)
    ours.load_state_dict(theirs.state_dict())
    x = MAKER.layer_inputs(13, 256, q=4, hw=10)
    for first in (True, False):
        if not first:
            theirs.ca_qpos_proj = ours.ca_qpos_proj = None
        y = batch_first(x)
        got = ours(y["tgt"], y["memory"], y["query_pos"], y["query_sine_embed"], y["memory_key_padding_mask"],
                   y["pos"])
        torch.testing.assert_close(got, theirs(**x, is_first=first).transpose(0, 1))


def test_decoder_matches_live_official_code():
    official = load_official_conditional()
    theirs = official.TransformerDecoder(official.TransformerDecoderLayer(256, 8, 64, dropout=0.0), 3,
                                         torch.nn.LayerNorm(256), return_intermediate=True, d_model=256).eval()
    ours = ConditionalDecoder(ConditionalDecoderLayer(256, 8, 64, dropout=0.0), 3, torch.nn.LayerNorm(256),
                              256).eval()
    MAKER.fill_(theirs, 14)
    ours.load_state_dict(theirs.state_dict())
    x = MAKER.layer_inputs(15, 256, q=4, hw=10)
    hs, reference = theirs(x["tgt"], x["memory"], memory_key_padding_mask=x["memory_key_padding_mask"],
                           pos=x["pos"], query_pos=x["query_pos"])
    y = batch_first(x)
    got_hs, got_reference = ours(y["tgt"], y["memory"], y["memory_key_padding_mask"], y["pos"], y["query_pos"])
    torch.testing.assert_close(got_hs, hs)
    torch.testing.assert_close(got_reference, reference)


# ----------------------------------------------------------------------------- behaviour

def test_outputs_heads_and_initial_boxes():
    model = small().eval()
    images = torch.rand(2, 3, 32, 40)
    out = model(images)
    assert model.class_embed.out_features == 3  # sigmoid per class, no "no object" logit
    torch.testing.assert_close(model.class_embed.bias, torch.full((3,), -torch.log(torch.tensor(99.0)).item()))
    assert out["pred_logits"].shape == (2, 6, 3) and out["pred_boxes"].shape == (2, 6, 4)
    assert len(out["aux_outputs"]) == 2
    # the last box layer starts at zero: every layer's box is centred on the reference point, 0.5 x 0.5
    src, mask = model.backbone(images)[0][-1]
    pos = model.backbone[1](mask)
    _, reference = model.transformer(model.input_proj(src), mask, model.query_embed.weight, pos)
    for boxes in [a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]]:
        torch.testing.assert_close(boxes[..., :2], reference)
        torch.testing.assert_close(boxes[..., 2:], torch.full_like(boxes[..., 2:], 0.5))


def test_inverse_sigmoid_clamps_at_conditional_detrs_epsilon():
    model = small().eval()
    with torch.no_grad():
        model.transformer.decoder.ref_point_head.layers[-1].bias.fill_(-30.0)  # references ~ 1e-13
        boxes = model(torch.rand(1, 3, 32, 40))["pred_boxes"]
    # with the box head at zero the centre is sigmoid(inverse_sigmoid(reference)); eps 1e-5 clamps it
    torch.testing.assert_close(boxes[..., :2], torch.full_like(boxes[..., :2], 1e-5 / (1 + 1e-5)))


def test_only_the_first_layer_adds_the_positional_query():
    model = small()
    layers = model.transformer.decoder.layers
    assert layers[0].ca_qpos_proj is not None
    assert all(layer.ca_qpos_proj is None for layer in layers[1:])
    assert not any(".1.ca_qpos_proj" in k or ".2.ca_qpos_proj" in k for k in model.state_dict())


def test_gradients_reach_every_parameter():
    model = small()
    torch.nn.init.normal_(model.bbox_embed.layers[-1].weight, std=0.1)  # away from the zero init
    out = model(torch.rand(2, 3, 32, 40))
    loss = out["pred_logits"].sum() + out["pred_boxes"].sum()
    loss = loss + sum(a["pred_logits"].sum() + a["pred_boxes"].sum() for a in out["aux_outputs"])
    loss.backward()
    # the first layer's content projections in self-attention multiply tgt = 0 (as official): their
    # weights get no gradient, only their biases
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == [f"transformer.decoder.layers.0.{name}.weight"
                       for name in ("sa_qcontent_proj", "sa_kcontent_proj", "sa_v_proj")]


def test_projection_free_attention_scales_by_the_query_head_width():
    attn = ProjectionFreeAttention(qk_dim=16, value_dim=8, num_heads=2).eval()
    torch.nn.init.eye_(attn.out_proj.weight)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 3, 16, generator=g), torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 8, generator=g)
    heads = []
    for h in range(2):  # head h: query/key channels 8h..8h+7 (width 8), value channels 4h..4h+3
        w = (q[0, :, 8 * h:8 * h + 8] @ k[0, :, 8 * h:8 * h + 8].T / 8 ** 0.5).softmax(-1)
        heads.append(w @ v[0, :, 4 * h:4 * h + 4])
    torch.testing.assert_close(attn(q, k, v)[0], torch.cat(heads, -1))


def test_bad_input():
    with pytest.raises(ValueError, match="last dimension of 2"):
        sine_embed_points(torch.rand(4, 3))
    with pytest.raises(ValueError, match=r"normalised to \[0, 1\]"):
        sine_embed_points(torch.tensor([[0.5, 1.2]]))
    with pytest.raises(ValueError, match=r"normalised to \[0, 1\]"):
        sine_embed_points(torch.tensor([[float("nan"), 0.5]]))
    with pytest.raises(ValueError, match="must divide"):
        build_conditional_detr(backbone="small", hidden_dim=36, nheads=8)
    with pytest.raises(ValueError, match="must divide"):
        ConditionalDecoderLayer(36, 8, 64, 0.0)
    with pytest.raises(ValueError, match="post-norm only"):
        ConditionalDecoderLayer(32, 4, 64, 0.0, normalize_before=True)
    with pytest.raises(ValueError, match="multiple of 4"):
        ConditionalDecoder(ConditionalDecoderLayer(30, 3, 64, 0.0), 2, torch.nn.LayerNorm(30), 30)
    model = small()
    with pytest.raises(ValueError, match="query_embed must have shape"):
        model.transformer(torch.rand(1, 32, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool), torch.rand(6, 4),
                          torch.rand(1, 32, 2, 2))
    assert isinstance(model, ConditionalDETR)

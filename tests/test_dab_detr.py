"""DAB-DETR: official layout and outputs, anchor refinement, where the detaches cut, errors."""
import os
import pathlib
import re

import pytest
import torch

from detr_tutorial.models import DABDETR, DABTransformer, build_dab_detr, build_deformable_detr, sine_embed_points
from detr_tutorial.models.conditional_layers import ConditionalDecoderLayer
from detr_tutorial.models.dab_detr import DABDecoder
from detr_tutorial.models.detr import MLP
from test_conditional_detr import MAKER, batch_first, check_r50, commit_of, official_attention, official_source
from test_ms_deform_attn import official_module

DAB_REPO = pathlib.Path(os.environ.get("DAB_DETR_REPO", "/work/.mirror/IDEA-Research+DAB-DETR/repo"))


@pytest.fixture(scope="module")
def vectors():
    return torch.load(pathlib.Path(__file__).parent / "data" / "conditional_dab_vectors.pt", weights_only=False)


def load_official_dab():
    """The official single-scale DAB-DETR transformer module, from the clone."""
    attention = official_attention(DAB_REPO, "models/DAB_DETR/attention.py")
    misc = official_source(DAB_REPO, "util/misc.py")
    inverse_sigmoid = re.search(r"def inverse_sigmoid\(.*?\n(?:    .*\n)+", misc).group(0)
    src = official_source(DAB_REPO, "models/DAB_DETR/transformer.py").replace(
        "from util.misc import inverse_sigmoid", inverse_sigmoid).replace(
        "from .attention import MultiheadAttention", "")
    return official_module("official_dab_transformer", src, MultiheadAttention=attention.MultiheadAttention)


def small_decoder(d=64, layers=2):
    decoder = DABDecoder(ConditionalDecoderLayer(d, 4, 96, 0.0, "prelu"), layers, torch.nn.LayerNorm(d), d).eval()
    decoder.bbox_embed = MLP(d, d, 4, 3)
    return decoder


def small(**kwargs):
    torch.manual_seed(0)
    options = dict(backbone="small", num_classes=3, hidden_dim=32, nheads=4, enc_layers=2, dec_layers=3,
                   dim_feedforward=64, num_queries=6, small_widths=(8, 16), small_strides=(2, 2))
    return build_dab_detr(**{**options, **kwargs})


# ----------------------------------------------------------------------------- stored official outputs

def test_stored_vectors_record_their_source(vectors):
    assert vectors["dab"]["commit"] == "723ddb80e95dbd3c9a2e4ef68c1e0fa9319167cf"
    if DAB_REPO.exists():  # regenerate the vectors when the clone moves on
        assert commit_of(DAB_REPO) == vectors["dab"]["commit"]


@pytest.mark.parametrize("dims", ["2d", "4d"])
def test_sine_embedding_matches_official(vectors, dims):
    case = vectors["dab"]["sine_embed"]
    torch.testing.assert_close(sine_embed_points(case[f"points_{dims}"]), case[f"official_{dims}"])


def test_decoder_with_modulation_matches_official(vectors):
    case = vectors["dab"]["dab_decoder"]
    decoder = small_decoder()
    MAKER.fill_(decoder, MAKER.SEED + 2)
    x = batch_first(case["inputs"])
    hs, references = decoder(x["tgt"], x["memory"], x["memory_key_padding_mask"], x["pos"],
                             x["refpoints_unsigmoid"].sigmoid())
    torch.testing.assert_close(hs, case["official_hs"])
    torch.testing.assert_close(references, case["official_references"])


def test_r50_layout_counts_and_outputs_match_official(vectors):
    torch.manual_seed(0)
    model = build_dab_detr()
    assert sum(p.numel() for p in model.parameters()) == 43_671_517
    assert model.num_queries == vectors["dab"]["dab_r50"]["num_queries"] == 300
    check_r50(model, vectors["dab"]["dab_r50"])


# ----------------------------------------------------------------------------- live official code

def test_transformer_matches_live_official_code():
    official = load_official_dab()
    g = torch.Generator().manual_seed(21)
    boxes = torch.rand(9, 3, 4, generator=g)
    torch.testing.assert_close(sine_embed_points(boxes), official.gen_sineembed_for_position(boxes))
    # d 256: the official encoder's query_scale is built for 256 channels whatever d_model is
    kwargs = dict(d_model=256, nhead=8, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64, dropout=0.0)
    theirs = official.Transformer(**kwargs, activation="prelu", return_intermediate_dec=True, query_dim=4).eval()
    ours = DABTransformer(**kwargs).eval()
    theirs.decoder.bbox_embed = official.MLP(256, 256, 4, 3)
    ours.decoder.bbox_embed = MLP(256, 256, 4, 3)
    MAKER.fill_(theirs, 22)
    ours.load_state_dict(theirs.state_dict())
    src, pos = torch.randn(2, 256, 3, 4, generator=g), torch.randn(2, 256, 3, 4, generator=g)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, 2:] = True
    anchors = torch.randn(5, 4, generator=g)
    for got, expected in zip(ours(src, mask, anchors, pos), theirs(src, mask, anchors, pos)):
        torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------- behaviour

def test_shared_box_head_and_initial_boxes():
    model = small().eval()
    assert model.transformer.decoder.bbox_embed is model.bbox_embed
    keys = model.state_dict().keys()
    assert "bbox_embed.layers.0.weight" in keys and "transformer.decoder.bbox_embed.layers.0.weight" in keys
    assert "query_embed.weight" not in keys and model.refpoint_embed.weight.shape == (6, 4)
    out = model(torch.rand(2, 3, 32, 40))
    assert out["pred_logits"].shape == (2, 6, 3) and len(out["aux_outputs"]) == 2
    # the box head starts at zero, so no layer moves the anchors: every box is the anchor
    anchors = model.refpoint_embed.weight.sigmoid().expand(2, -1, -1)
    for boxes in [a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]]:
        torch.testing.assert_close(boxes, anchors)


def test_inverse_sigmoid_clamps_at_dab_detrs_epsilon():
    model = small().eval()
    with torch.no_grad():
        model.refpoint_embed.weight[0] = -30.0  # an anchor at sigmoid(-30) ~ 1e-13 in every coordinate
        box = model(torch.rand(1, 3, 32, 40))["pred_boxes"][0, 0]
    # with the box head at zero the box is sigmoid(inverse_sigmoid(anchor)); eps 1e-3 clamps it to 1e-3 / 1
    torch.testing.assert_close(box, torch.full((4,), 1e-3 / (1 + 1e-3)))


def test_references_are_the_previous_layers_boxes():
    decoder = small_decoder(d=32, layers=3)
    MAKER.fill_(decoder, 3)
    x = batch_first(MAKER.layer_inputs(4, 32))
    anchors = torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(5)) * 0.8 + 0.1
    hs, references = decoder(torch.zeros_like(x["tgt"]), x["memory"], x["memory_key_padding_mask"], x["pos"], anchors)
    assert hs.shape == (3, 2, 5, 32) and references.shape == (3, 2, 5, 4)
    torch.testing.assert_close(references[0], anchors)
    assert not torch.allclose(references[1], references[0])


def box_head_calls(head):
    """Record every output of ``head`` (keeping its gradient) in the returned list."""
    calls = []

    def hook(module, args, output):
        output.retain_grad()
        calls.append(output)
    head.register_forward_hook(hook)
    return calls


def reached(t):
    """Whether the backward pass brought a nonzero gradient to ``t``."""
    return t.grad is not None and bool(t.grad.abs().sum() > 0)


def test_box_loss_reaches_the_previous_layers_box_head_in_dab_detr_only():
    model = small()
    torch.nn.init.normal_(model.bbox_embed.layers[-1].weight, std=0.1)  # away from the zero init
    calls = box_head_calls(model.bbox_embed)
    model(torch.rand(2, 3, 32, 40))["pred_boxes"].sum().backward()  # the last layer's (l = 2) box loss
    decoder_calls = calls[:3]  # the decoder's updates of layers 0, 1, 2; calls[3] is the head on hs
    assert reached(decoder_calls[1])  # layer l-1's box: the reference of layer l, kept in the graph
    assert not reached(decoder_calls[0])  # layer l-2's box reaches layer l only through detached anchors
    assert not reached(decoder_calls[2])  # layer l's own update only feeds a next layer

    torch.manual_seed(0)
    deformable = build_deformable_detr(backbone="small", num_classes=3, hidden_dim=32, nheads=4, enc_layers=1,
                                       dec_layers=3, dim_feedforward=64, num_queries=6, small_widths=(8, 16, 32),
                                       with_box_refine=True)
    heads = [box_head_calls(head) for head in deformable.bbox_embed]  # per layer: [decoder call, output call]
    for head in deformable.bbox_embed:
        torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    deformable(torch.rand(2, 3, 32, 40))["pred_boxes"].sum().backward()
    assert not reached(heads[1][0])  # layer l-1's refined box reaches layer l detached: no gradient
    assert reached(heads[2][1])  # (the loss does reach layer l's own head)


def test_bad_input():
    with pytest.raises(ValueError, match="last dimension of 2"):
        sine_embed_points(torch.rand(5, 3))  # a 3-d anchor
    model = small()
    src, pos, mask = torch.rand(1, 32, 2, 2), torch.rand(1, 32, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"must have shape \(Q, 4\)"):
        model.transformer(src, mask, torch.rand(6, 3), pos)
    decoder = small_decoder(d=32)
    x = batch_first(MAKER.layer_inputs(4, 32))
    with pytest.raises(ValueError, match=r"normalised to \[0, 1\]"):
        decoder(x["tgt"], x["memory"], x["memory_key_padding_mask"], x["pos"], torch.full((2, 5, 4), 1.5))
    with pytest.raises(ValueError, match=r"anchors must have shape \(B, Q, 4\)"):
        decoder(x["tgt"], x["memory"], x["memory_key_padding_mask"], x["pos"], torch.rand(2, 5, 3))
    decoder.bbox_embed = None
    with pytest.raises(RuntimeError, match="bbox_embed is not set"):
        decoder(x["tgt"], x["memory"], x["memory_key_padding_mask"], x["pos"], torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match="must divide"):
        small(hidden_dim=36, nheads=8)
    assert isinstance(model, DABDETR)

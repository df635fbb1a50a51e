"""Loading official-layout DETR state dicts."""
from pathlib import Path

import pytest
import torch

from detr_tutorial.checkpoints import CheckpointMismatchError, load_official_detr
from detr_tutorial.models import build_detr
from detr_tutorial.run_dir import CheckpointError

VECTORS = Path(__file__).parent / "data" / "official_vectors.pt"


def small(seed, **kwargs):
    torch.manual_seed(seed)
    options = dict(backbone="resnet18", num_classes=4, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                   dim_feedforward=64, num_queries=5)
    return build_detr(**{**options, **kwargs}).eval()


def randomise_frozen_bn(state_dict, seed=1):
    """Pretrained-like BatchNorm statistics, so that loading them changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    out = dict(state_dict)
    for k, v in state_dict.items():
        if k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("running_mean"):
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
    return out


def test_official_layout_round_trip():
    """A state dict with exactly the official R50 keys and shapes loads, and every tensor lands."""
    layout = torch.load(VECTORS, weights_only=True)["detr_r50_state_dict_keys"]
    fake = {k: torch.full(shape, float(i)) for i, (k, shape) in enumerate(layout)}  # tensor i holds i
    model = build_detr()
    assert load_official_detr(model, {"model": fake, "epoch": 499}) is model
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in fake.items())


def test_loaded_model_reproduces_the_source_model():
    source = small(0)
    source.load_state_dict(randomise_frozen_bn(source.state_dict()))
    target = small(1)
    images = torch.rand(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, 40:] = True
    with torch.no_grad():
        expected = source(images, mask)
        assert not torch.allclose(target(images, mask)["pred_boxes"], expected["pred_boxes"])
        load_official_detr(target, source.state_dict())
        got = target(images, mask)
    for key in ("pred_logits", "pred_boxes"):  # the same weights and operations: the same numbers
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)


def test_transformer_vectors_load_through_the_model():
    vec = torch.load(VECTORS, weights_only=True)["transformer"]
    kw = vec["kwargs"]
    model = small(0, hidden_dim=kw["d_model"], nheads=kw["nhead"], enc_layers=kw["num_encoder_layers"],
                  dec_layers=kw["num_decoder_layers"], dim_feedforward=kw["dim_feedforward"], dropout=0.0)
    state = model.state_dict()
    state.update({"transformer." + k: v for k, v in vec["state_dict"].items()})
    load_official_detr(model, state)
    with torch.no_grad():
        hs, memory = model.transformer(vec["src"], vec["mask"], vec["query_embed"], vec["pos_embed"])
    torch.testing.assert_close(hs, vec["hs"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(memory, vec["memory"], atol=1e-5, rtol=1e-5)


def test_mismatches_are_listed_and_nothing_is_loaded():
    model = small(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = small(1, num_classes=9).state_dict()
    other["extra.weight"] = torch.zeros(1)
    del other["query_embed.weight"]
    with pytest.raises(CheckpointMismatchError) as info:
        load_official_detr(model, other)
    message = str(info.value)
    assert "missing key(s): query_embed.weight" in message
    assert "unexpected key(s): extra.weight" in message
    assert "class_embed.weight: checkpoint (10, 32), model (5, 32)" in message
    assert "num_classes=9" in message
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert isinstance(info.value, ValueError)


def test_a_value_that_is_not_a_tensor_is_reported_and_nothing_is_loaded():
    model = small(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = small(1).state_dict()
    state["query_embed.weight"] = state["query_embed.weight"].tolist()
    with pytest.raises(CheckpointMismatchError, match=r"query_embed\.weight: checkpoint holds a list, expected a "
                                                      r"tensor of shape \(5, 32\)"):
        load_official_detr(model, state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_file_is_loaded_weights_only(tmp_path):
    source, target = small(0), small(1)
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "release.pth")
    load_official_detr(target, tmp_path / "release.pth")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    torch.save({"model": source.state_dict(), "args": Path("not/a/tensor")}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match=r"pickled\.pth holds Python objects .* weights-only"):
        load_official_detr(target, str(tmp_path / "pickled.pth"))
    (tmp_path / "cut.pth").write_bytes((tmp_path / "release.pth").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cut\.pth \(1000 bytes\) cannot be read .* truncated or corrupt"):
        load_official_detr(target, tmp_path / "cut.pth")


def test_backbone_mismatch_hint():
    model = small(0)
    with pytest.raises(CheckpointMismatchError, match="backbone="):
        load_official_detr(model, small(0, backbone="resnet34").state_dict())


def test_type_errors():
    with pytest.raises(TypeError, match="state_dict"):
        load_official_detr(small(0), [1, 2])
    with pytest.raises(TypeError, match="model"):
        load_official_detr("detr", {})

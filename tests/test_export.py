"""Exporting DETR and Deformable DETR with torch.export and to ONNX (run with onnxruntime)."""
import pytest
import torch

from conftest import padded_pair
from detr_tutorial.export import export_onnx, export_program, main
from detr_tutorial.models import build_deformable_detr, build_detr

SMALL = dict(backbone="small", num_classes=3, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
             dim_feedforward=64, num_queries=5)
BUILDERS = {"detr": lambda: build_detr(**SMALL),
            "deformable": lambda: build_deformable_detr(**SMALL, enc_n_points=2, dec_n_points=2)}


def batch():
    """Two 64x96 images, the second padded at the bottom and on the right (mask True on padding)."""
    return padded_pair(64, 96, 48, 72)


def eager(model, images, mask=None):
    with torch.no_grad():
        out = model.eval()(images, mask)
    return out["pred_logits"], out["pred_boxes"]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_torch_export_matches_eager(name):
    torch.manual_seed(0)
    model = BUILDERS[name]()
    images, mask = batch()
    program = export_program(model, images, mask)
    with torch.no_grad():
        logits, boxes = program.module()(images, mask)
    expected_logits, expected_boxes = eager(model, images, mask)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(boxes, expected_boxes, atol=1e-5, rtol=1e-5)
    # the padding mask is an input of the graph, not a constant: other padding, other outputs
    other = torch.zeros_like(mask)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images, other)[0], eager(model, images, other)[0],
                                   atol=1e-5, rtol=1e-5)
    assert not torch.allclose(eager(model, images, other)[0][1], expected_logits[1], atol=1e-4)


def test_deformable_onnx_matches_eager(tmp_path):
    pytest.importorskip("onnxscript")  # torch.onnx.export(..., dynamo=True) translates with it
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = BUILDERS["deformable"]()
    images, mask = batch()
    path = export_onnx(model, images, tmp_path / "deformable.onnx", mask)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images", "mask"]
    logits, boxes = session.run(["pred_logits", "pred_boxes"], {"images": images.numpy(), "mask": mask.numpy()})
    expected_logits, expected_boxes = eager(model, images, mask)
    torch.testing.assert_close(torch.from_numpy(logits), expected_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(boxes), expected_boxes, atol=1e-4, rtol=1e-4)


def test_command_exports_a_transformers_detr(tmp_path, capsys):
    """The command line route: a transformers folder -> ONNX -> onnxruntime, equal to the eager model."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    transformers = pytest.importorskip("transformers")
    from detr_tutorial.hub import load_hf_checkpoint

    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                         out_features=["stage4"])
    config = transformers.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                                     num_queries=5, d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4,
                                     num_labels=3)
    transformers.DetrForObjectDetection(config).save_pretrained(tmp_path / "hf")
    out = str(tmp_path / "detr.onnx")
    assert main(["--checkpoint", str(tmp_path / "hf"), "--out", out, "--size", "64", "96", "--dynamic"]) == 0
    assert "detr.onnx" in capsys.readouterr().out
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    model = load_hf_checkpoint(tmp_path / "hf")
    images, _ = batch()
    for example in (images[:1], torch.randn(2, 3, 80, 112)):  # the example's size, then another batch and size
        logits, boxes = session.run(None, {"images": example.numpy()})
        expected_logits, expected_boxes = eager(model, example)
        torch.testing.assert_close(torch.from_numpy(logits), expected_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(boxes), expected_boxes, atol=1e-4, rtol=1e-4)


def test_bad_input_is_refused_before_export(tmp_path):
    torch.manual_seed(0)
    model = BUILDERS["detr"]()
    images, mask = batch()
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        export_program("detr", images)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\)"):
        export_program(model, images[:, :1])
    full = mask.clone()
    full[1] = True  # the second image is all padding: eager mode refuses it, the graph could not
    with pytest.raises(ValueError, match="block every key"):
        export_program(model, images, full)
    with pytest.raises(ValueError, match=r"must end in \.onnx"):
        export_onnx(model, images, tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        export_onnx(model, images, tmp_path / "missing" / "model.onnx")
    with pytest.raises(ValueError, match="dynamic=True supports DETR only"):
        export_program(BUILDERS["deformable"](), images, mask, dynamic=True)
    with pytest.raises(ValueError, match="batch of at least 2"):
        export_program(model, images[:1], dynamic=True)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        main(["--checkpoint", str(tmp_path / "nothing.pth"), "--out", str(tmp_path / "m.onnx")])

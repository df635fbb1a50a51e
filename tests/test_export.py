"""Exporting DETR, Deformable DETR, Conditional DETR and DAB-DETR with torch.export and to ONNX (onnxruntime)."""
import re

import pytest
import torch

from conftest import broken_hf_folders, padded_pair, save_hf
from detr_tutorial.export import export_onnx, export_program, load_for_export, main
from detr_tutorial.hub import load_hf_checkpoint
from detr_tutorial.models import build_conditional_detr, build_dab_detr, build_deformable_detr, build_detr
from detr_tutorial.presets import get_preset, make_trainer

SMALL = dict(backbone="small", num_classes=3, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
             dim_feedforward=64, num_queries=5)
BUILDERS = {"detr": lambda: build_detr(**SMALL),
            "deformable": lambda: build_deformable_detr(**SMALL, enc_n_points=2, dec_n_points=2),
            "conditional": lambda: build_conditional_detr(**SMALL), "dab": lambda: build_dab_detr(**SMALL)}


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


def onnx_matches_eager(path, model, examples):
    """onnxruntime's outputs of the ONNX file equal the eager model's on each example batch (1e-4)."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for example in examples:
        logits, boxes = session.run(None, {"images": example.numpy()})
        expected_logits, expected_boxes = eager(model, example)
        torch.testing.assert_close(torch.from_numpy(logits), expected_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(boxes), expected_boxes, atol=1e-4, rtol=1e-4)


def test_command_exports_a_transformers_detr(tmp_path, capsys):
    """The command line route: a transformers folder -> ONNX -> onnxruntime, equal to the eager model."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("transformers")
    save_hf(tmp_path / "hf", "detr")
    out = str(tmp_path / "detr.onnx")
    assert main(["--checkpoint", str(tmp_path / "hf"), "--out", out, "--size", "64", "96", "--dynamic"]) == 0
    assert "detr.onnx" in capsys.readouterr().out
    images, _ = batch()  # the example's size, then another batch and size
    onnx_matches_eager(out, load_hf_checkpoint(tmp_path / "hf"), (images[:1], torch.randn(2, 3, 80, 112)))


def test_command_exports_a_trainer_run(tmp_path, capsys):
    """A run folder of a short training (tiny preset, one epoch) exports through the loader predict uses;
    torch.export and onnxruntime give the eager outputs of the trained weights."""
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    trainer = make_trainer(get_preset("tiny", epochs=1), model="detr", out_dir=tmp_path / "run", progress=False)
    trainer.fit()
    model = load_for_export(tmp_path / "run")
    assert not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trainer.model.state_dict().items())
    out = tmp_path / "tiny.onnx"
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--size", "32", "48", "--batch", "2"]) == 0
    assert "(2, 3, 32, 48)" in capsys.readouterr().out
    images = torch.rand(2, 3, 32, 48)
    onnx_matches_eager(out, model, [images])
    with torch.no_grad():
        logits, boxes = export_program(model, images).module()(images)
    expected_logits, expected_boxes = eager(model, images)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(boxes, expected_boxes, atol=1e-4, rtol=1e-4)


def test_command_refuses_broken_checkpoints_naming_the_file(tmp_path, capsys):
    pytest.importorskip("transformers")
    save_hf(tmp_path / "hf", "detr")
    absent = tmp_path / "nothing.pth"
    cases = broken_hf_folders(tmp_path / "hf", tmp_path) + [(absent, re.escape(f"{absent}: no such checkpoint file"))]
    for checkpoint, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx")])
        assert exit_.value.code == 2 and re.search(f"--checkpoint: {message}", capsys.readouterr().err)
    assert not (tmp_path / "m.onnx").exists()


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

"""Predict on a photo: a generated image, checkpoints the tests write, and every refused input."""
import json
import re

import pytest
import torch
import torchvision
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from conftest import broken_hf_folders, save_hf
from detr_tutorial import predict
from detr_tutorial.checkpoints import CheckpointMismatchError
from detr_tutorial.data import CLASSES, CocoConfig, ShapesDataset, export_coco_folder
from detr_tutorial.data.coco_transforms import coco_transforms
from detr_tutorial.models import build_detr
from detr_tutorial.presets import get_coco_preset, make_trainer
from detr_tutorial.run_dir import CheckpointError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as the trainer writes it (untrained: prediction needs weights, not good ones)."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    trainer = make_trainer("tiny", model="detr", out_dir=out, progress=False)
    trainer.save_checkpoint(out / "checkpoint.pth")
    return out


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A generated 'photo', 48 x 64 pixels (not square, not the training size)."""
    image = ShapesDataset(1, image_size=48, max_image_size=64, seed=11)[0][0]
    pixels = F.resize((image * 255).round().to(torch.uint8), [48, 64])
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    F.to_pil_image(pixels).save(path)
    return path


def _lines(capsys):
    out = capsys.readouterr().out.splitlines()
    return out[0], [line.split(maxsplit=5) for line in out[1:] if not line.startswith("wrote ")]


def test_cli_prints_detections_and_draws_them(run_dir, photo, tmp_path, capsys):
    out = tmp_path / "pred.png"
    argv = ["--checkpoint", str(run_dir), "--image", str(photo), "--out", str(out), "--threshold", "0"]
    assert predict.main(argv) == 0
    header, rows = _lines(capsys)
    assert header.startswith(f"{len(rows)} detections with score >= 0 in {photo} (64 x 48 pixels)")
    assert len(rows) == 6  # the tiny preset's queries: DETR keeps one detection per query
    scores = [float(r[0]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    for row in rows:
        x0, y0, x1, y1 = map(float, row[1:5])
        assert x0 <= x1 and y0 <= y1 and row[5] in CLASSES
    drawn, original = (F.pil_to_tensor(Image.open(p).convert("RGB")) for p in (out, photo))
    assert drawn.shape == original.shape and not torch.equal(drawn, original)
    assert predict.main(["--checkpoint", str(run_dir / "checkpoint.pth"), "--image", str(photo),
                         "--threshold", "1"]) == 0
    assert _lines(capsys)[1] == []


def test_boxes_are_in_the_photos_pixels(run_dir, photo):
    predictor = predict.load_predictor(run_dir)
    assert predictor.image_size == 32 and predictor.classes == CLASSES and not predictor.normalize
    image = predict.read_image(photo)
    detections = predictor(image, threshold=0.0)
    resized = F.resize(image, [32]).float() / 255  # shorter side 32, as the tiny preset's images
    with torch.no_grad():
        outputs = predictor.model(resized[None], torch.zeros((1, *resized.shape[-2:]), dtype=torch.bool))
    probs = outputs["pred_logits"].softmax(-1)[0, :, :-1]
    scores, order = probs.max(-1).values.sort(descending=True)
    cx, cy, w, h = outputs["pred_boxes"][0, order].unbind(-1)
    expected = torch.stack([(cx - w / 2) * 64, (cy - h / 2) * 48, (cx + w / 2) * 64, (cy + h / 2) * 48], -1)
    torch.testing.assert_close(detections["scores"], scores)
    torch.testing.assert_close(detections["boxes"], expected)


def test_a_coco_folder_run_predicts_with_its_class_names(tmp_path, photo):
    export_coco_folder(ShapesDataset(8, image_size=32, seed=2), tmp_path / "images", tmp_path / "instances.json")
    images, path = str(tmp_path / "images"), str(tmp_path / "instances.json")
    data = CocoConfig(images, path, images, path, image_size=40, normalize=True)
    trainer = make_trainer(get_coco_preset("tiny", data), model="deformable_detr", progress=False)
    trainer.save_checkpoint(tmp_path / "checkpoint.pth")
    predictor = predict.load_predictor(tmp_path / "checkpoint.pth")
    assert predictor.classes == CLASSES and predictor.image_size == 40 and predictor.normalize
    assert type(predictor.model).__name__ == "DeformableDETR"
    detections = predictor(predict.read_image(photo), threshold=0.0)
    assert len(detections["scores"]) > 0 and detections["labels"].max() < 3


def test_an_official_detr_release_is_read_from_its_weights(tmp_path, photo):
    model = build_detr("resnet18", num_classes=91, hidden_dim=16, enc_layers=1, dec_layers=2, dim_feedforward=24,
                       num_queries=5, pre_norm=True)
    torch.save({"model": model.state_dict(), "args": {"lr": 1e-4}}, tmp_path / "detr-official.pth")
    predictor = predict.load_predictor(tmp_path / "detr-official.pth")
    assert predictor.classes == predict.COCO_CLASSES and predictor.normalize and predictor.image_size == 800
    loaded = predictor.model.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    predictor.image_size, predictor.max_size = 64, None  # the official 800 pixels take seconds on a CPU
    detections = predictor(predict.read_image(photo), threshold=0.0)
    assert len(detections["scores"]) == 5


def _refused(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        predict.main(list(argv))
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_bad_photos_are_refused_naming_the_file(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    assert f"--image {broken} cannot be read as an image" in _refused(capsys, "--checkpoint", str(run_dir),
                                                                      "--image", str(broken))
    assert "no such file" in _refused(capsys, "--checkpoint", str(run_dir), "--image", str(tmp_path / "none.png"))
    with pytest.raises(ValueError, match=r"uint8 \(3, H, W\)"):
        predict.load_predictor(run_dir)(torch.rand(3, 8, 8))


def test_bad_checkpoints_are_refused_naming_the_file(run_dir, photo, tmp_path, capsys):
    data = (run_dir / "checkpoint.pth").read_bytes()
    truncated, corrupt = tmp_path / "truncated.pth", tmp_path / "corrupt.pth"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt.write_bytes(data[:-200] + bytes(200))  # the zip's central directory overwritten
    for path in (truncated, corrupt):
        err = _refused(capsys, "--checkpoint", str(path), "--image", str(photo))
        assert f"--checkpoint: {path}" in err and "truncated or corrupt" in err
    err = _refused(capsys, "--checkpoint", str(tmp_path / "absent.pth"), "--image", str(photo))
    assert "absent.pth: no such checkpoint file" in err
    resnet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet)
    assert "weights of another architecture" in _refused(capsys, "--checkpoint", str(resnet), "--image", str(photo))
    err = _refused(capsys, "--checkpoint", str(run_dir), "--image", str(photo), "--model", "dab_detr")
    assert "holds a detr model, not a dab_detr" in err
    assert "--device must be cpu, cuda or auto" in _refused(capsys, "--checkpoint", str(run_dir), "--image", str(photo),
                                                            "--device", "tpu")
    assert "--threshold must be in [0, 1]" in _refused(capsys, "--checkpoint", str(run_dir), "--image", str(photo),
                                                       "--threshold", "1.5")


def test_weights_of_another_model_than_the_run_records_are_refused(run_dir, tmp_path):
    state = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    state["run"]["model"] = "deformable_detr"  # DETR's weights under a Deformable DETR record
    torch.save(state, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointMismatchError, match="missing key"):
        predict.load_predictor(tmp_path / "mixed.pth")
    del state["classes"]
    state["run"].update(model="detr", data={"train_json": "x.json", "image_size": 32})
    torch.save(state, tmp_path / "nameless.pth")
    with pytest.raises(CheckpointError, match="nameless.pth does not record its class names"):
        predict.load_predictor(tmp_path / "nameless.pth")


@pytest.fixture(scope="module")
def hf_detr(tmp_path_factory):
    """A random transformers DETR saved with save_pretrained, named classes, and an image processor whose
    size (shorter side 64, longer at most 100) the predictor must follow: (folder, transformers model)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_detr")
    hf_model = save_hf(folder, "detr")
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "cat", "1": "dog", "2": "kite"}
    (folder / "config.json").write_text(json.dumps(config))
    transformers.DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 100}).save_pretrained(folder)
    return folder, hf_model


def test_a_transformers_folder_predicts_as_transformers_post_processes(hf_detr, photo, capsys):
    """The printed detections equal transformers' post-processing of its own model's outputs on the same pixels
    (the image processor's PIL resize differs from torchvision's by interpolation, so both models get the
    predictor's resized, normalised photo): same class names, scores within the printed 3 decimals, boxes
    within the printed 0.1 pixel."""
    from transformers import DetrImageProcessor

    folder, hf_model = hf_detr
    assert predict.main(["--checkpoint", str(folder), "--image", str(photo), "--threshold", "0"]) == 0
    rows = _lines(capsys)[1]
    image = predict.read_image(photo)
    pixels = coco_transforms(False, 64, 100, normalize=True)(tv_tensors.Image(image)).as_subclass(torch.Tensor)
    assert pixels.shape == (3, 64, 85)  # 48 x 64 photo, shorter side to 64
    with torch.no_grad():
        outputs = hf_model(pixel_values=pixels[None])
    expected = DetrImageProcessor().post_process_object_detection(outputs, threshold=0, target_sizes=[(48, 64)])[0]
    order = expected["scores"].argsort(descending=True)
    assert len(rows) == len(order) == 5  # 5 queries, one detection each
    assert [r[5] for r in rows] == [("cat", "dog", "kite")[int(expected["labels"][i])] for i in order]
    torch.testing.assert_close(torch.tensor([float(r[0]) for r in rows]), expected["scores"][order],
                               atol=5e-4 + 1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor([[float(v) for v in r[1:5]] for r in rows]), expected["boxes"][order],
                               atol=0.05 + 1e-4, rtol=0)


def test_a_transformers_dab_detr_folder_gets_its_recipes_post_processing(tmp_path, photo):
    pytest.importorskip("transformers")
    save_hf(tmp_path, "dab-detr")
    predictor = predict.load_predictor(tmp_path, model_name="dab_detr")
    assert type(predictor.model).__name__ == "DABDETR" and predictor.classes == ("LABEL_0", "LABEL_1", "LABEL_2")
    assert (predictor.image_size, predictor.max_size, predictor.normalize) == (800, 1333, True)  # DETR's defaults
    predictor.image_size, predictor.max_size = 64, None  # 800 pixels take seconds on a CPU
    detections = predictor(predict.read_image(photo), threshold=0.0)
    assert len(detections["scores"]) == 15  # top-k over 5 queries x 3 classes (the recipe keeps up to 300)
    with pytest.raises(ValueError, match=f"--model detr: {tmp_path} holds a dab_detr model"):
        predict.load_predictor(tmp_path, model_name="detr")


def test_broken_transformers_folders_are_refused_naming_the_file(hf_detr, photo, tmp_path, capsys):
    for folder, message in broken_hf_folders(hf_detr[0], tmp_path):
        err = _refused(capsys, "--checkpoint", str(folder), "--image", str(photo))
        assert re.search(f"--checkpoint: {message}", err)


def test_an_image_processor_the_predictor_cannot_follow_is_refused(hf_detr, tmp_path):
    folder, _ = hf_detr
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    for change, message in [({"image_mean": [0.5, 0.5, 0.5]}, "ImageNet's mean and std, not image_mean=[0.5"),
                            ({"do_normalize": False}, "do_normalize=False"),
                            ({"size": {"height": 64, "width": 64}}, "expected JSON with size.shortest_edge")]:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({**processor, **change}))
        with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'preprocessor_config.json'}: ") + ".*"
                           + re.escape(message)):
            predict.load_predictor(tmp_path)

"""Your own data: COCO folders written from the shapes data set, read back through torchvision, trained on."""
import json
import shutil

import pytest
import torch

from detr_tutorial import presets, train
from detr_tutorial.data import (CLASSES, CocoConfig, CocoFolder, RandomSizeCrop, ShapesDataset, coco_loaders,
                                coco_transforms, collate_fn, export_coco_folder)
from detr_tutorial.data.coco_transforms import scaled_sizes

NUM_IMAGES = 16  # two batches of the 'tiny' preset


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(NUM_IMAGES, image_size=32, max_image_size=48, seed=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, shapes):
    root = tmp_path_factory.mktemp("coco")
    export_coco_folder(shapes, root / "images", root / "instances.json")
    return root


def _copy(folder, tmp_path, edit=None):
    """A private copy of the folder, with ``edit(json_dict)`` applied to its json."""
    shutil.copytree(folder, tmp_path / "coco")
    path = tmp_path / "coco" / "instances.json"
    if edit is not None:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return tmp_path / "coco" / "images", path


def test_round_trip_gives_the_shapes_targets_and_pixels(folder, shapes):
    ds = CocoFolder(folder / "images", folder / "instances.json")
    assert len(ds) == len(shapes) and ds.classes == CLASSES and ds.category_ids == (0, 1, 2) and ds.no_object == 3
    for i in range(len(shapes)):
        image, target = ds[i]
        expected_image, expected = shapes[i]
        torch.testing.assert_close(image, expected_image)
        assert target.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(target[key], expected[key], msg=key)


IDS = {0: 1, 1: 5, 2: 9}  # shapes label -> a non-contiguous category id
NAMES = {1: "rectangle", 5: "ellipse", 9: "triangle"}


def _non_contiguous(data):
    data["categories"] = [{"id": i, "name": n} for i, n in NAMES.items()]
    for ann in data["annotations"]:
        ann["category_id"] = IDS[ann["category_id"]]


def test_non_contiguous_ids_official_and_contiguous(folder, shapes, tmp_path):
    images, path = _copy(folder, tmp_path, _non_contiguous)
    official = CocoFolder(images, path)
    assert official.num_classes == 10 and official.no_object == 10
    assert official.classes == ("N/A", "rectangle", "N/A", "N/A", "N/A", "ellipse", "N/A", "N/A", "N/A", "triangle")
    contiguous = CocoFolder(images, path, contiguous_ids=True)
    assert contiguous.classes == CLASSES and contiguous.category_ids == (1, 5, 9)
    for i in range(4):
        labels = shapes[i][1]["labels"]
        assert official[i][1]["labels"].tolist() == [IDS[int(c)] for c in labels]
        assert torch.equal(contiguous[i][1]["labels"], labels)
    wider = CocoFolder(images, path, num_classes=91)
    assert wider.num_classes == 91 and wider.classes[9] == "triangle" and wider.classes[90] == "N/A"
    with pytest.raises(ValueError, match=r"num_classes=3 is too small for .*instances.json.*largest category id is 9"):
        CocoFolder(images, path, num_classes=3)
    with pytest.raises(ValueError, match=r"num_classes=2 is too small .*need at least 3 \(3 categories\)"):
        CocoFolder(images, path, num_classes=2, contiguous_ids=True)


def _extras(data):
    """An image without annotations (a copy of image 0's file), a crowd box and a zero-width box on image 1."""
    first = data["images"][0]
    data["images"].append(dict(first, id=100, file_name=first["file_name"]))
    box = next(a for a in data["annotations"] if a["image_id"] == 1)
    data["annotations"] += [dict(box, id=1000, iscrowd=1), dict(box, id=1001, bbox=[*box["bbox"][:2], 0, 5])]


def test_image_without_annotations_crowd_and_empty_boxes(folder, shapes, tmp_path):
    images, path = _copy(folder, tmp_path, _extras)
    ds = CocoFolder(images, path, transforms=coco_transforms(True, 32))
    index = len(ds) - 1  # ids are sorted: 100 comes last
    image, target = ds[index]
    assert int(target["image_id"]) == 100 and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    _, mask, targets = collate_fn([ds[0], ds[index]])
    assert mask.shape[0] == 2 and targets[1]["boxes"].shape == (0, 4)
    plain = CocoFolder(images, path)
    torch.testing.assert_close(plain[1][1]["boxes"], shapes[1][1]["boxes"])  # crowd and zero-width dropped


def _set_bbox(bbox):
    return lambda data: data["annotations"][0].update(bbox=bbox)


@pytest.mark.parametrize("edit, message", [
    (_set_bbox([30.0, 2.0, 40.0, 5.0]), r"annotation 1: bbox .* lies outside its image 0"),
    (_set_bbox([2.0, 2.0, -4.0, 5.0]), r"annotation 1: bbox .* has a negative size \(width -4.0"),
    (_set_bbox([2.0, 2.0, 4.0]), "annotation 1: bbox must be"),
    (_set_bbox([2.0, float("nan"), 4.0, 5.0]), "annotation 1: bbox must be .* finite"),
    (lambda d: d["annotations"][0].update(category_id=77), "annotation 1 has category_id 77, which is not in"),
    (lambda d: d["annotations"][0].update(image_id=555), "annotation 1 refers to image_id 555"),
    (lambda d: d["images"].append(dict(d["images"][0])), "images has the id 0 twice"),
    (lambda d: d["categories"].append({"id": -1, "name": "x"}), "needs an int id >= 0"),
    (lambda d: d["images"][0].update(width=0), "image 0 needs a file_name and positive int width"),
    (lambda d: d["images"][0].update(width=d["images"][0]["width"] + 3), r"is \d+ x \d+ pixels but .*instances.json"),
    (lambda d: d["images"][0].update(file_name="missing.png"), "missing.png cannot be read as an image"),
    (lambda d: d.pop("categories"), r"instances.json is not a COCO json: it lacks the lists \['categories'\]"),
])
def test_bad_json_is_refused_with_the_file_and_entry(folder, tmp_path, edit, message):
    images, path = _copy(folder, tmp_path, edit)
    with pytest.raises(ValueError, match=message) as error:
        CocoFolder(images, path)
    assert "instances.json" in str(error.value) or "missing.png" in str(error.value)


def test_unreadable_files_are_refused(folder, tmp_path):
    images, path = _copy(folder, tmp_path)
    (images / "000002.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"image 2: .*000002.png cannot be read as an image"):
        CocoFolder(images, path)
    with pytest.raises(ValueError, match=r"000002.png cannot be read"):
        CocoFolder(images, path, check_images=False)[2]
    path.write_text("{not json")
    with pytest.raises(ValueError, match="instances.json is not valid JSON"):
        CocoFolder(images, path)
    with pytest.raises(ValueError, match="nowhere.json does not exist"):
        CocoFolder(images, tmp_path / "nowhere.json")
    with pytest.raises(ValueError, match="is not a folder"):
        CocoFolder(tmp_path / "no_images", path)


def test_a_box_within_a_pixel_of_the_border_is_clamped(folder, tmp_path):
    def overshoot(data):
        image = data["images"][0]
        data["annotations"][0].update(bbox=[0.0, 0.0, image["width"] + 0.5, image["height"] + 0.5])
    images, path = _copy(folder, tmp_path, overshoot)
    boxes = CocoFolder(images, path)[0][1]["boxes"]
    torch.testing.assert_close(boxes[0], torch.tensor([0.5, 0.5, 1.0, 1.0]))


def test_scaled_sizes_are_the_official_ones_at_800():
    official = scaled_sizes(800)
    assert official == {"scales": (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800), "max_size": 1333,
                        "crop_resize": (400, 500, 600), "crop": (384, 600)}
    train, val = coco_transforms(True, 800).transforms, coco_transforms(False, 800).transforms
    assert [type(t).__name__ for t in train] == ["RandomHorizontalFlip", "RandomChoice", "SanitizeBoundingBoxes"]
    assert train[0].p == 0.5 and train[1].p == [0.5, 0.5]
    plain, cropped = train[1].transforms
    assert (plain.min_size, plain.max_size) == (list(official["scales"]), 1333)
    assert [type(t).__name__ for t in cropped.transforms] == ["RandomShortestSize", "RandomSizeCrop",
                                                              "RandomShortestSize"]
    assert cropped.transforms[0].min_size == [400, 500, 600] and cropped.transforms[2] is plain
    assert (cropped.transforms[1].min_size, cropped.transforms[1].max_size) == (384, 600)
    assert len(val) == 1 and (val[0].min_size, val[0].max_size) == ([800], 1333)
    small = scaled_sizes(64)
    assert small["scales"][-1] == 64 and small["scales"][0] == round(480 * 64 / 800) and small["max_size"] == 107
    for bad in ({"image_size": 4}, {"image_size": 64, "max_size": 32}, {"image_size": 64.0}):
        with pytest.raises(ValueError, match="image_size|max_size"):
            scaled_sizes(**bad)


def test_training_augmentation_keeps_boxes_on_the_image(folder):
    ds = CocoFolder(folder / "images", folder / "instances.json", transforms=coco_transforms(True, 32))
    sizes = scaled_sizes(32)
    torch.manual_seed(0)
    shapes_seen, flips = set(), 0
    for _ in range(3):
        for i in range(len(ds)):
            image, target = ds[i]
            h, w = image.shape[-2:]
            capped = max(h, w) >= sizes["max_size"] - 1
            assert max(h, w) <= sizes["max_size"] and (min(h, w) in sizes["scales"] or capped)
            assert target["size"].tolist() == [h, w] and len(target["labels"]) == len(target["boxes"])
            boxes = target["boxes"]
            corners = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], dim=1)
            assert (corners >= -1e-6).all() and (corners <= 1 + 1e-6).all()
            assert (boxes[:, 2:] > 0).all()
            shapes_seen.add((h, w))
    assert len(shapes_seen) > 5  # multi-scale
    torch.manual_seed(1)
    first = ds[3]
    torch.manual_seed(1)
    again = ds[3]
    torch.testing.assert_close(first, again)  # the global torch RNG decides: a resumed run repeats its crops


def test_random_size_crop_bounds_and_small_images():
    from torchvision import tv_tensors
    crop = RandomSizeCrop(10, 20)
    torch.manual_seed(0)
    for _ in range(20):
        h, w = crop(tv_tensors.Image(torch.zeros(3, 30, 40, dtype=torch.uint8))).shape[-2:]
        assert 10 <= h <= 20 and 10 <= w <= 20
    assert crop(tv_tensors.Image(torch.zeros(3, 6, 8, dtype=torch.uint8))).shape[-2:] == (6, 8)
    with pytest.raises(ValueError, match="min_size <= max_size"):
        RandomSizeCrop(20, 10)


def test_coco_loaders_batches_and_checks(folder, tmp_path):
    images, path = str(folder / "images"), str(folder / "instances.json")
    train_loader, val_loader, classes = coco_loaders(CocoConfig(images, path, images, path, image_size=32), 8)
    assert classes == CLASSES and len(train_loader) == 2
    batch, mask, targets = next(iter(val_loader))
    assert batch.shape[0] == mask.shape[0] == len(targets) == 8 and batch.dtype == torch.float32
    with pytest.raises(ValueError, match="16 images, fewer than one batch of 32"):
        coco_loaders(CocoConfig(images, path, images, path, image_size=32), 32)
    other_images, other = _copy(folder, tmp_path, _non_contiguous)
    with pytest.raises(ValueError, match="define different classes"):
        coco_loaders(CocoConfig(images, path, str(other_images), str(other), image_size=32), 8)
    with pytest.raises(ValueError, match="image_size must be an int >= 8"):
        CocoConfig(images, path, images, path, image_size=4)


def _cli(out, folder, *extra):
    images, path = str(folder / "images"), str(folder / "instances.json")
    return train.main(["--preset", "tiny", "--out", str(out), "--device", "cpu", "--no-progress", "--epochs", "1",
                       "--coco-train", images, path, "--coco-val", images, path, "--image-size", "32", *extra])


def test_cli_trains_two_steps_from_a_folder(folder, tmp_path, capsys):
    assert _cli(tmp_path / "run", folder) == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert state["step"] == 2 and state["classes"] == list(CLASSES)
    data = state["run"]["data"]
    assert data["train_json"] == str(folder / "instances.json") and data["image_size"] == 32
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "AP", "AP50"} <= record.keys()
    with pytest.raises(SystemExit):  # resuming on other data is refused, naming the flag
        _cli(tmp_path / "run", folder, "--resume", str(tmp_path / "run" / "checkpoint.pth"), "--image-size", "40")
    assert "data.image_size: 40 from --image-size, but 32 in the checkpoint" in capsys.readouterr().err


def test_cli_refuses_bad_coco_arguments(folder, tmp_path, capsys):
    images, path = str(folder / "images"), str(folder / "instances.json")
    for extra, message in ((["--coco-train", images, path], "needs both --coco-train"),
                           (["--coco-train", images, path, "--coco-val", images, path, "--object-size", "0.1", "0.2"],
                            "--object-size sets the synthetic shapes")):
        with pytest.raises(SystemExit):
            train.main(["--preset", "tiny", "--out", str(tmp_path / "x"), *extra])
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"num_classes=2 is too small for .*instances.json"):
        _cli(tmp_path / "small", folder, "--num-classes", "2")
    assert json.loads((tmp_path / "small" / "commands.jsonl").read_text())["status"] == "failed"


def test_get_coco_preset_keeps_the_model_and_optimisation(folder):
    images, path = str(folder / "images"), str(folder / "instances.json")
    preset = presets.get_coco_preset("tiny", CocoConfig(images, path, images, path, image_size=32), epochs=3)
    assert preset.models == presets.PRESETS["tiny"].models and preset.train.epochs == 3
    assert presets.describe_run(preset, "detr")["data"]["val_json"] == path
    with pytest.raises(TypeError, match="CocoConfig"):
        presets.get_coco_preset("tiny", presets.PRESETS["tiny"].data)


def test_cli_resume_on_a_folder_repeats_the_augmentation(folder, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _cli(straight, folder, "--epochs", "2")
    _cli(split, folder)
    _cli(split, folder, "--epochs", "2", "--resume", str(split / "checkpoint.pth"))
    a, b = (torch.load(run / "checkpoint.pth", weights_only=True) for run in (straight, split))
    assert a["step"] == b["step"] == 4 and a["step_log"] == b["step_log"]  # same crops, flips and shuffles
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key

"""detr_tutorial.recipes: each model trains with its official coefficients, one logits convention throughout."""
import pytest
import torch

from detr_tutorial.data import ShapesDataset, collate_fn
from detr_tutorial.postprocess import PostProcess, PostProcessTopK
from detr_tutorial.presets import MODELS, PRESETS
from detr_tutorial.recipes import RECIPES, loss_weights

# model -> (class loss weight, matcher class cost, post-processor, detections kept) from each official main.py
OFFICIAL = {
    "detr": (1, 1, PostProcess, None),
    "deformable_detr": (2, 2, PostProcessTopK, 100),
    "conditional_detr": (2, 2, PostProcessTopK, 100),
    "dab_detr": (1, 2, PostProcessTopK, 300),
}


def test_presets_use_the_recipes():
    assert MODELS is RECIPES
    # DETR3D's recipe (3-D data and loss): tests/test_detr3d.py; the denoising ones: tests/test_dn_training.py
    assert set(OFFICIAL) | {"detr3d", "dn_detr", "dino"} == set(RECIPES)


def test_loss_weights_repeat_for_earlier_layers_and_the_encoder():
    w = loss_weights({"loss_ce": 2, "loss_bbox": 5}, num_aux=2, encoder=True)
    assert w == {"loss_ce": 2, "loss_bbox": 5, "loss_ce_0": 2, "loss_bbox_0": 5, "loss_ce_1": 2, "loss_bbox_1": 5,
                 "loss_ce_enc": 2, "loss_bbox_enc": 5}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_recipe_has_the_official_coefficients(name):
    cls_weight, cost_class, post_type, k = OFFICIAL[name]
    model, criterion, post = RECIPES[name](3, **PRESETS["tiny"].models[name])
    layers = model.transformer.decoder.num_layers
    assert criterion.weight_dict["loss_ce"] == cls_weight
    assert criterion.weight_dict["loss_bbox"] == 5 and criterion.weight_dict["loss_giou"] == 2
    assert criterion.weight_dict[f"loss_ce_{layers - 2}"] == cls_weight and f"loss_ce_{layers - 1}" not in \
        criterion.weight_dict
    assert criterion.matcher.cost_class == cost_class
    assert type(post) is post_type and getattr(post, "k", None) == k


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_one_training_step_lowers_the_loss_on_a_repeated_batch(name):
    torch.manual_seed(0)
    model, criterion, post = RECIPES[name](3, **PRESETS["tiny"].models[name])
    images, mask, targets = collate_fn([ShapesDataset(4, image_size=32, seed=0)[i] for i in range(4)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss_dict = criterion(model(images, mask), targets)
        loss = sum(loss_dict[k] * w for k, w in criterion.weight_dict.items())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    detections = post(model(images, mask), torch.tensor([[32, 32]] * 4))
    assert len(detections) == 4 and detections[0]["labels"].max() < 3


@pytest.mark.parametrize("preset", ["tiny", "shapes_cpu", "race", "race_long"])
def test_successors_share_detrs_sizes_in_every_preset(preset):
    models = PRESETS[preset].models
    for name in ("conditional_detr", "dab_detr"):
        assert models[name] == models["detr"], f"{preset}: {name} must be trained at DETR's sizes"

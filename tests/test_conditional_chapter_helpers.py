"""decoder_cross_attention: the weights it returns are the ones the models use (chapter 14)."""
import pytest
import torch

from detr_tutorial.data import ShapesDataset, collate_fn
from detr_tutorial.models import build_conditional_detr, build_dab_detr, build_detr
from detr_tutorial.models.attention_maps import decoder_cross_attention

SMALL = dict(backbone="small", num_classes=3, small_widths=(8, 8, 16), hidden_dim=16, nheads=2, enc_layers=1,
             dec_layers=2, dim_feedforward=32, num_queries=5, dropout=0.0)


@pytest.fixture(scope="module")
def batch():
    data = ShapesDataset(2, image_size=32, max_image_size=48, seed=0)
    images, mask, _ = collate_fn([data[0], data[1]])
    assert mask.any(), "the batch must hold padding"
    return images, mask


def record_outputs(modules):
    """Forward hooks that keep each module's output; returns (list of outputs, hooks)."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, out: seen.append(out)) for m in modules]
    return seen, hooks


def test_detr_weights_average_to_the_modules_own(batch):
    torch.manual_seed(0)
    model = build_detr(**SMALL).train()
    seen, hooks = record_outputs([layer.multihead_attn for layer in model.transformer.decoder.layers])
    weights, outputs = decoder_cross_attention(model, *batch)
    for hook in hooks:
        hook.remove()
    assert model.training, "the model's mode is restored"
    assert weights.shape == (2, 2, 2, 5, 6, 6)  # layers, B, heads, Q, h, w (48 px at stride 8)
    for layer, (_, averaged) in enumerate(seen):
        torch.testing.assert_close(weights[layer].mean(1).flatten(-2), averaged)
    assert set(outputs) >= {"pred_logits", "pred_boxes"}


@pytest.mark.parametrize("build", [build_conditional_detr, build_dab_detr])
def test_conditional_weights_reproduce_the_attention_output(batch, build):
    torch.manual_seed(0)
    model = build(**SMALL).eval()
    layers = model.transformer.decoder.layers
    seen, hooks = record_outputs([layer.cross_attn for layer in layers])
    values, v_hooks = record_outputs([layer.ca_v_proj for layer in layers])
    weights, _ = decoder_cross_attention(model, *batch)
    for hook in hooks + v_hooks:
        hook.remove()
    images, mask = batch
    sums = weights.flatten(-2).sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    padded = torch.nn.functional.interpolate(mask[None].float(), size=weights.shape[-2:])[0].bool()  # (B, h, w)
    assert (weights.permute(0, 2, 3, 1, 4, 5)[:, :, :, padded] == 0).all(), "no weight on padding"
    for layer, (out, v) in enumerate(zip(seen, values)):
        w = weights[layer].flatten(-2)  # (B, h, Q, HW)
        heads = (w @ v.unflatten(-1, (2, -1)).transpose(1, 2)).transpose(1, 2).flatten(2)  # (B, Q, d)
        torch.testing.assert_close(layers[layer].cross_attn.out_proj(heads), out)


def test_spatial_only_is_the_attention_of_a_model_without_content(batch):
    torch.manual_seed(0)
    model = build_conditional_detr(**SMALL).eval()
    with torch.no_grad():
        for layer in model.transformer.decoder.layers:
            for name in ("ca_qcontent_proj", "ca_kcontent_proj", "ca_qpos_proj"):
                if getattr(layer, name) is not None:
                    getattr(layer, name).weight.zero_()
                    getattr(layer, name).bias.zero_()
    full, _ = decoder_cross_attention(model, *batch)
    spatial, _ = decoder_cross_attention(model, *batch, spatial_only=True)
    torch.testing.assert_close(spatial, full)
    torch.manual_seed(0)
    model = build_conditional_detr(**SMALL)
    full, _ = decoder_cross_attention(model, *batch)
    with_content, _ = decoder_cross_attention(model, *batch, spatial_only=True)
    assert not torch.allclose(with_content, full), "with content, the full maps differ from the spatial ones"
    # in layer 0 the spatial query comes from the reference point alone (lambda = 1), whatever the content
    torch.testing.assert_close(with_content[0], spatial[0])

def test_bad_models_are_named(batch):
    with pytest.raises(TypeError, match="DETR, ConditionalDETR or DABDETR"):
        decoder_cross_attention(torch.nn.Linear(2, 2), *batch)
    with pytest.raises(ValueError, match="spatial_only"):
        decoder_cross_attention(build_detr(**SMALL), *batch, spatial_only=True)

"""The OpenMMLab view: configs built through the registry equal the library's builders; plugins; errors."""
import sys
import textwrap

import pytest
import torch
from mmengine import Config
from mmengine.registry import DefaultScope
from mmengine.registry import MODELS as ROOT_MODELS

from detr_tutorial.models import build_deformable_detr, build_detr
from detr_tutorial.openmmlab import MODELS, config_path, import_plugin, plugin_module_name
from detr_tutorial.openmmlab.parts import ChannelMapper
from detr_tutorial.presets import MODELS as RECIPES
from detr_tutorial.presets import PRESETS

SHAPES_CONFIGS = {"detr": "detr/detr_shapes_cpu.py", "deformable_detr": "deformable_detr/deformable-detr_shapes_cpu.py",
                  "conditional_detr": "conditional_detr/conditional-detr_shapes_cpu.py",
                  "dab_detr": "dab_detr/dab-detr_shapes_cpu.py"}


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _model_cfg(name):
    return Config.fromfile(config_path(name)).model


def test_registry_is_a_scoped_child_of_mmengine_models():
    assert MODELS.parent is ROOT_MODELS and MODELS.scope == "detr_tutorial"
    for name in ("DETR", "DeformableDETR", "ConditionalDETR", "DABDETR", "ResNet", "ChannelMapper", "DETRHead",
                 "DeformableDETRHead", "SinePositionalEncoding", "HungarianAssigner"):
        assert name in MODELS, name
    with DefaultScope.overwrite_default_scope("detr_tutorial"):  # the Runner's route: the root finds the child
        model = ROOT_MODELS.build(_model_cfg("detr/detr_tiny.py"))
    assert type(model).__name__ == "Detector"


@pytest.mark.parametrize("name", sorted(SHAPES_CONFIGS))
def test_config_built_model_equals_the_library_builder(name):
    built = MODELS.build(_model_cfg(SHAPES_CONFIGS[name]))
    model, criterion, postprocess = RECIPES[name](3, **PRESETS["shapes_cpu"].models[name])
    assert _count(built) == _count(model)
    assert built.detector.state_dict().keys() == model.state_dict().keys()
    built.detector.load_state_dict(model.state_dict())
    built.eval(), model.eval()
    torch.manual_seed(0)
    images, mask = torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, :, 40:] = True
    with torch.no_grad():
        out, ref = built(images, mask, mode="tensor"), model(images, mask)
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"], rtol=0, atol=0)
    assert built.head.criterion.weight_dict == criterion.weight_dict
    assert built.head.criterion.eos_coef == criterion.eos_coef
    assert built.head.criterion.focal_alpha == criterion.focal_alpha
    m, r = built.head.criterion.matcher, criterion.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.focal_alpha) == (r.cost_class, r.cost_bbox, r.cost_giou,
                                                                        r.focal_alpha)
    assert type(built.head.postprocess) is type(postprocess)
    assert getattr(built.head.postprocess, "k", None) == getattr(postprocess, "k", None)


@pytest.mark.parametrize("name, builder", [("detr/detr_r50_8xb2-150e_coco.py", build_detr),
                                           ("deformable_detr/deformable-detr_r50_16xb2-50e_coco.py",
                                            build_deformable_detr)])
def test_mmdetection_r50_configs_have_the_builders_parameters(name, builder):
    built = MODELS.build(_model_cfg(name))
    reference = builder(num_classes=80)
    assert _count(built) == _count(reference)
    trainable = [n for n, p in built.detector.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in reference.named_parameters() if p.requires_grad]


def test_loss_mode_matches_the_criterion():
    built = MODELS.build(_model_cfg("detr/detr_tiny.py"))
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]]),
                "image_id": torch.tensor(0), "size": torch.tensor([32, 32])}]
    images = torch.rand(1, 3, 32, 32)
    torch.manual_seed(0)
    losses = built(images, None, targets, mode="loss")
    terms = built.head.criterion(built(images, None, mode="tensor"), targets)
    weights = built.head.criterion.weight_dict
    torch.testing.assert_close(sum(v for k, v in losses.items() if "loss" in k),
                               sum(terms[k] * weights[k] for k in weights))
    predictions = built(images, None, targets, mode="predict")
    assert predictions[0]["image_id"] == 0 and predictions[0]["boxes"].shape == (6, 4)


def test_channel_mapper_is_the_multi_scale_input_projection():
    cfg = _model_cfg(SHAPES_CONFIGS["deformable_detr"])
    built = MODELS.build(cfg)
    neck = MODELS.build(cfg.neck)
    neck.load_state_dict({k.replace("input_proj.", "convs."): v for k, v in built.detector.state_dict().items()
                          if k.startswith("input_proj.")})
    images, mask = torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        features = [x for x, _ in built.detector.backbone[0](images, mask)]
        srcs = built.detector.multi_scale(images, mask)[0]
        outs = neck(features)
    assert [o.shape[-1] for o in outs] == [32, 16, 8, 4]
    for out, src in zip(outs, srcs):
        torch.testing.assert_close(out, src, rtol=0, atol=0)


@pytest.mark.parametrize("frozen_stages, trainable", [(1, ["layer2", "layer3", "layer4"]), (3, ["layer4"]),
                                                      (-1, ["conv1", "layer1", "layer2", "layer3", "layer4"])])
def test_resnet_frozen_stages(frozen_stages, trainable):
    backbone = MODELS.build(dict(type="ResNet", depth=18, frozen_stages=frozen_stages))
    stages = sorted({n.split(".")[0] for n, p in backbone.body.named_parameters() if p.requires_grad})
    assert stages == trainable
    backbone.train()
    bn = backbone.body.bn1
    before = bn.running_mean.clone()
    backbone(torch.rand(2, 3, 64, 64))
    assert torch.equal(bn.running_mean, before)  # norm_eval: frozen statistics even in train mode


def test_unknown_type_is_named():
    cfg = _model_cfg("detr/detr_tiny.py")
    cfg.backbone.type = "ResNeXtPlusPlus"
    with pytest.raises(KeyError, match="ResNeXtPlusPlus"):
        MODELS.build(cfg)


@pytest.mark.parametrize("key", ["bbox_head", "neck", "train_cfg"])
def test_missing_key_is_named(key):
    cfg = _model_cfg("detr/detr_tiny.py")
    del cfg[key]
    with pytest.raises(ValueError, match=key):
        MODELS.build(cfg)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.neck.update(in_channels=[32]), "does not fit"),
    (lambda c: c.bbox_head.loss_cls.update(type="FocalLoss"), "CrossEntropyLoss"),
    (lambda c: c.train_cfg.assigner.match_costs.pop(), "cost_giou"),
    (lambda c: c.__setitem__("backbone", dict(type="ResNet", depth=18, norm_eval=False)), "norm_eval"),
])
def test_settings_the_library_does_not_build_are_refused(change, message):
    cfg = _model_cfg("detr/detr_tiny.py")
    change(cfg)
    with pytest.raises(ValueError, match=message):
        MODELS.build(cfg)


def _write_plugin(root, package, body):
    folder = root / "projects" / package
    folder.mkdir(parents=True)
    (root / "projects" / "__init__.py").touch()
    (folder / "__init__.py").write_text(textwrap.dedent(body))


PLUGIN = """
from detr_tutorial.models import SmallBackbone
from detr_tutorial.openmmlab import MODELS


@MODELS.register_module(name="{name}")
class PluginBackbone(SmallBackbone):
    pass
"""


@pytest.fixture
def plugin_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m == "projects" or m.startswith("projects.")]:
        del sys.modules[name]
    for name in [n for n in MODELS.module_dict if n.startswith("PluginBackbone")]:
        MODELS.module_dict.pop(name)


def test_plugin_dir_route_registers_a_module_the_config_uses(plugin_root):
    _write_plugin(plugin_root, "my_plugin", PLUGIN.format(name="PluginBackbone1"))
    cfg = Config.fromfile(config_path("detr/detr_tiny.py"))
    cfg.merge_from_dict({"plugin": True, "plugin_dir": "projects/my_plugin/", "model.backbone.type": "PluginBackbone1"})
    with pytest.raises(KeyError, match="PluginBackbone1"):
        MODELS.build(cfg.model)
    assert plugin_module_name(cfg.plugin_dir) == "projects.my_plugin"
    import_plugin(cfg)
    model = MODELS.build(cfg.model)
    assert type(model.detector.backbone[0]).__name__ == "PluginBackbone"


def test_custom_imports_route_registers_a_module_the_config_uses(plugin_root):
    _write_plugin(plugin_root, "other_plugin", PLUGIN.format(name="PluginBackbone2"))
    config = plugin_root / "cfg.py"
    config.write_text(f"_base_ = [{str(config_path('detr/detr_tiny.py'))!r}]\n"
                      "custom_imports = dict(imports=['projects.other_plugin'], allow_failed_imports=False)\n"
                      "model = dict(backbone=dict(type='PluginBackbone2'))\n")
    model = MODELS.build(Config.fromfile(str(config)).model)
    assert type(model.detector.backbone[0]).__name__ == "PluginBackbone"


def test_a_plugin_that_fails_to_import_is_named(plugin_root):
    _write_plugin(plugin_root, "broken_plugin", "import a_module_that_does_not_exist\n")
    cfg = Config(dict(plugin=True, plugin_dir="projects/broken_plugin/"))
    with pytest.raises(ImportError, match="projects/broken_plugin/.*a_module_that_does_not_exist"):
        import_plugin(cfg)
    config = plugin_root / "cfg.py"
    config.write_text("custom_imports = dict(imports=['projects.missing_plugin'], allow_failed_imports=False)\n")
    with pytest.raises(ImportError, match="projects.missing_plugin"):
        Config.fromfile(str(config))
    with pytest.raises(ValueError, match="plugin_dir"):
        import_plugin(Config(dict(plugin=True)))
    with pytest.raises(ValueError, match="plugin_dir"):
        plugin_module_name("../outside/")


def test_the_configs_positional_encoding_is_used():
    cfg = _model_cfg("detr/detr_tiny.py")
    cfg.positional_encoding.update(temperature=20, normalize=False)
    position = MODELS.build(cfg).detector.backbone[1]
    assert (position.temperature, position.normalize) == (20, False)


@pytest.mark.parametrize("config, preset", [("detr/detr_shapes_cpu.py", "shapes_cpu"), ("detr/detr_tiny.py", "tiny")])
def test_shapes_configs_follow_the_presets(config, preset):
    from detr_tutorial.openmmlab import preset_options

    cfg = Config.fromfile(config_path(config))
    merged = Config.fromfile(config_path(config))
    merged.merge_from_dict(preset_options(PRESETS[preset]))
    for key in ("train_dataloader", "val_dataloader", "optim_wrapper", "train_cfg", "param_scheduler"):
        assert merged[key] == cfg[key], key  # the config already says what the preset says
    model, _, _ = RECIPES["detr"](3, **PRESETS[preset].models["detr"])
    assert _count(MODELS.build(cfg.model)) == _count(model)


def test_preset_options_schedule():
    from detr_tutorial.openmmlab import preset_options
    from detr_tutorial.presets import get_preset

    options = preset_options(get_preset("shapes_cpu", epochs=30, lr_drop=10, warmup_steps=0, clip_max_norm=0))
    assert options["param_scheduler"] == [dict(type="MultiStepLR", begin=0, end=30, by_epoch=True, gamma=0.1,
                                               milestones=[10, 20])]
    assert options["optim_wrapper.clip_grad"] is None
    with pytest.raises(TypeError, match="preset"):
        preset_options("shapes_cpu")


@pytest.mark.parametrize("run", ["detr_shapes_live", "detr_shapes_live_seed1"])
def test_recorded_engine_run_is_shapes_live(run):
    """Chapter 18 compares the Runner with these recorded engine runs; they must still be the preset's runs."""
    import dataclasses
    import json
    from pathlib import Path

    from detr_tutorial.presets import get_preset

    record = Path(__file__).parents[1] / "book" / "openmmlab_runs" / run
    command = json.loads((record / "commands.jsonl").read_text().splitlines()[-1])
    preset = get_preset("shapes_live")
    assert command["status"] == "finished" and command["model"] == "detr"
    assert command["preset"]["data"] == json.loads(json.dumps(dataclasses.asdict(preset.data)))
    assert command["preset"]["train"] == json.loads(json.dumps(dataclasses.asdict(preset.train)))
    assert command["preset"]["models"]["detr"] == json.loads(json.dumps(preset.models["detr"]))
    epochs = [json.loads(line) for line in (record / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == preset.train.epochs and "AP50" in epochs[-1]

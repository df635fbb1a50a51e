"""The mini DETR3D through the OpenMMLab-style entry: a DETR3D-style config with plugin lines, the plugin's
registrations, the builder's weights under the same seed, and the engine's steps and scores on ``detr3d_tiny``."""
import copy
import json

import pytest
import torch
from mmengine import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

from detr_tutorial.detr3d_training import seen_targets
from detr_tutorial.notebook import seed_everything
from detr_tutorial.openmmlab import HOOKS, MODELS, config_path, import_plugin, preset_options
from detr_tutorial.openmmlab.train import load_config, runner_checkpoint_globals
from detr_tutorial.presets import MODELS as RECIPES
from detr_tutorial.presets import PRESETS, get_preset, make_trainer

CONFIGS = {"detr3d_live": "detr3d/detr3d_mini.py", "detr3d_tiny": "detr3d/detr3d_tiny.py"}
LOSSES: list[float] = []


@HOOKS.register_module(name="Detr3DParityLossHook", force=True)
class Detr3DParityLossHook(Hook):
    """Keep every training iteration's loss, exactly."""

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        LOSSES.append(outputs["loss"].item())


def _config(name: str) -> Config:
    cfg = Config.fromfile(config_path(name))
    import_plugin(cfg)
    return cfg


def test_the_config_names_the_plugin_as_detr3d_does():
    cfg = Config.fromfile(config_path(CONFIGS["detr3d_live"]))
    assert cfg.plugin is True and cfg.plugin_dir == "detr_tutorial/openmmlab/detr3d_plugin/"
    plugin = import_plugin(cfg)
    assert plugin.__name__ == "detr_tutorial.openmmlab.detr3d_plugin"
    for name in ("Detr3D", "Detr3DHead", "HungarianAssigner3D", "NMSFreeCoder"):
        assert name in MODELS, name
    assert type(MODELS.build(cfg.model)).__name__ == "MultiViewDetector"


@pytest.mark.parametrize("preset", sorted(CONFIGS))
def test_config_follows_the_preset_and_draws_the_builders_weights(preset):
    cfg = _config(CONFIGS[preset])
    merged = _config(CONFIGS[preset])
    merged.merge_from_dict(preset_options(PRESETS[preset]))
    for key in ("train_dataloader", "val_dataloader", "optim_wrapper", "train_cfg", "param_scheduler"):
        assert merged[key] == cfg[key], key  # the config already says what the preset says
    torch.manual_seed(0)
    built = MODELS.build(cfg.model)
    after_config = torch.get_rng_state()
    torch.manual_seed(0)
    model, criterion, coder = RECIPES["detr3d"](3, **PRESETS[preset].models["detr3d"])
    assert torch.equal(after_config, torch.get_rng_state())  # the data order that follows is the same
    assert sum(p.numel() for p in built.parameters()) == sum(p.numel() for p in model.parameters())
    expected = model.state_dict()
    assert built.detector.state_dict().keys() == expected.keys()
    for key, value in built.detector.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    ours = built.head.criterion
    assert ours.weight_dict == criterion.weight_dict
    assert torch.equal(ours.code_weights, criterion.code_weights)
    assert (ours.assigner.cls_weight, ours.assigner.reg_weight) == (criterion.assigner.cls_weight,
                                                                     criterion.assigner.reg_weight)
    assert vars(built.head.postprocess) == vars(coder)


def test_runner_route_takes_the_engines_steps_and_scores(tmp_path, monkeypatch):
    # the Runner logs, dumps and checkpoints the config's text six times, each formatted by yapf: 30 of the 40 s
    # this test took on 2 busy cores, for DETR3D's deeply nested head. The text stays valid, only unformatted.
    monkeypatch.setattr("mmengine.config.config.FormatCode", lambda text, **kwargs: (text, False))
    preset = get_preset("detr3d_tiny")  # 2 steps per epoch, 2 epochs, scored after each
    seed_everything(0)
    trainer = make_trainer(preset, model="detr3d", progress=False)
    trainer.fit()

    LOSSES.clear()
    options = {**preset_options(preset), "log_level": "ERROR",
               "custom_hooks": [dict(type="MetricsLogHook"), dict(type="Detr3DParityLossHook")]}
    cfg = load_config(str(config_path(CONFIGS["detr3d_tiny"])), work_dir=str(tmp_path), cfg_options=options)
    runner = Runner.from_cfg(cfg)
    with runner_checkpoint_globals():
        runner.train()
    assert runner.iter == trainer.step == 4
    assert LOSSES == [r["loss"] for r in trainer.step_log]
    expected = trainer.model.state_dict()
    for name, value in runner.model.detector.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == len(trainer.epoch_log) == 2
    for ours, theirs in zip(records, trainer.epoch_log):  # NuScenesMetric == the engine's evaluate_detr3d
        scores = {k.removeprefix("nuscenes/"): v for k, v in ours.items() if k.startswith("nuscenes/")}
        assert scores == {k: theirs[k] for k in scores} and scores.keys() >= {"mAP", "mATE", "AP_car"}


def test_metric_pairs_each_scene_with_its_boxes():
    from detr_tutorial.openmmlab.detr3d_plugin import MultiViewWorld, NuScenesMetric

    world = MultiViewWorld(4, num_cams=4, image_hw=(32, 48), distance=(3.0, 20.0), seed=3)
    targets = [item[2] for item in world]
    seen = [seen_targets(t) for t in targets]  # the boxes that count (hidden ones would be false positives)
    perfect = [dict(boxes=t["boxes"], scores=torch.ones(len(t["labels"])), labels=t["labels"],
                    image_id=int(t["scene_id"])) for t in seen]
    metric = NuScenesMetric(classes=world.metainfo["classes"])
    metric.process((None, None, targets[:2]), perfect[:2])
    metric.process((None, None, targets[2:]), perfect[2:])
    assert metric.compute_metrics(metric.results)["mAP"] == pytest.approx(1.0, rel=1e-12)
    metric.results = []
    metric.process((None, None, targets), perfect[::-1])  # every scene scored with another scene's boxes
    assert metric.compute_metrics(metric.results)["mAP"] < 0.5
    with pytest.raises(ValueError, match="predictions for a batch"):
        metric.process((None, None, targets), perfect[:1])


def test_settings_the_library_does_not_build_are_refused():
    cfg = _config(CONFIGS["detr3d_tiny"])
    changes = [(lambda m: m.update(use_grid_mask=True), "GridMask"),
               (lambda m: m.pts_bbox_head.update(with_box_refine=False), "with_box_refine"),
               (lambda m: m.pts_bbox_head.transformer.decoder.transformerlayers.attn_cfgs[1].update(num_points=5),
                "num_points"),
               (lambda m: m.pts_bbox_head.transformer.decoder.transformerlayers.attn_cfgs[1].update(dropout=0.1),
                "dropout"),
               (lambda m: m.pts_bbox_head.update(loss_iou=dict(type="GIoULoss", loss_weight=2.0)), "loss_iou"),
               (lambda m: m.train_cfg.pts.assigner.update(iou_cost=dict(type="IoUCost", weight=1.0)), "iou_cost"),
               (lambda m: m.img_neck.update(in_channels=[8, 8, 8]), "does not fit")]
    for change, message in changes:
        model = copy.deepcopy(cfg.model)
        change(model)
        with pytest.raises(Exception, match=message):
            MODELS.build(model)

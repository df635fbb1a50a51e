"""The Runner route trains the engine's steps: same seed, same preset -> the same losses and weights, bit for bit.

The engine (``make_trainer`` after ``seed_everything``) and mmengine's Runner (``randomness.seed``) on the
``tiny`` preset, evaluated after every epoch; the Runner stops after two epochs and a second Runner resumes
the third from the checkpoint, as chapter 18 trains. Initial weights, data order, loss, clipping, AdamW and
the warm-up all have to agree for the losses of every iteration and the final weights to be equal.
"""
import pytest
import torch
from mmengine.hooks import Hook
from mmengine.runner import Runner

from detr_tutorial.notebook import seed_everything
from detr_tutorial.openmmlab import HOOKS, GlobalRandomSampler, config_path, preset_options
from detr_tutorial.openmmlab.train import load_config, runner_checkpoint_globals
from detr_tutorial.presets import get_preset, make_trainer

LOSSES: list[float] = []


@HOOKS.register_module(name="ParityLossHook", force=True)
class ParityLossHook(Hook):
    """Keep every training iteration's loss, exactly."""

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        LOSSES.append(outputs["loss"].item())


def _runner(work_dir, preset, epochs: int, resume: bool) -> Runner:
    options = {**preset_options(preset), "train_cfg.max_epochs": epochs, "log_level": "ERROR",
               "custom_hooks": [dict(type="ParityLossHook")]}
    cfg = load_config(str(config_path("detr/detr_tiny.py")), work_dir=str(work_dir), cfg_options=options,
                      resume="auto" if resume else None)
    runner = Runner.from_cfg(cfg)
    with runner_checkpoint_globals():
        runner.train()
    return runner


def test_runner_route_takes_the_engines_steps(tmp_path):
    preset = get_preset("tiny", epochs=3)  # 2 steps per epoch, warm-up over 2 steps, validation every epoch
    seed_everything(0)
    trainer = make_trainer(preset, progress=False)
    trainer.fit()

    LOSSES.clear()
    _runner(tmp_path, preset, epochs=2, resume=False)
    runner = _runner(tmp_path, preset, epochs=3, resume=True)
    assert runner.iter == trainer.step == 6
    engine_losses = [r["loss"] for r in trainer.step_log]
    assert LOSSES == engine_losses, (LOSSES, engine_losses)
    expected = trainer.model.state_dict()
    for name, value in runner.model.detector.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_sampler_arguments_are_checked():
    with pytest.raises(ValueError, match="skip_draws"):
        GlobalRandomSampler(range(4), skip_draws=-1)
    with pytest.raises(TypeError, match="seed"):
        GlobalRandomSampler(range(4), seed="0")


@pytest.mark.parametrize("name, config", [("detr", "detr/detr_shapes_cpu.py"),
                                          ("deformable_detr", "deformable_detr/deformable-detr_shapes_cpu.py"),
                                          ("conditional_detr", "conditional_detr/conditional-detr_shapes_cpu.py"),
                                          ("dab_detr", "dab_detr/dab-detr_shapes_cpu.py")])
def test_config_route_draws_the_builders_initial_weights(name, config):
    """Same seed -> the same initial weights, and torch's generator left in the same state (the data order)."""
    from mmengine import Config

    from detr_tutorial.openmmlab import MODELS
    from detr_tutorial.presets import MODELS as RECIPES
    from detr_tutorial.presets import PRESETS

    torch.manual_seed(0)
    built = MODELS.build(Config.fromfile(config_path(config)).model).detector.state_dict()
    after_config = torch.get_rng_state()
    torch.manual_seed(0)
    direct = RECIPES[name](3, **PRESETS["shapes_cpu"].models[name])[0].state_dict()
    assert torch.equal(after_config, torch.get_rng_state())
    assert built.keys() == direct.keys()
    for key, value in direct.items():
        torch.testing.assert_close(built[key], value, rtol=0, atol=0, msg=key)

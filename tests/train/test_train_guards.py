"""Training guards: NaN/inf stops with the step, group and last save named; --init-from a foreign file."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_training import run, write_config
from sdtrain.config import load_config
from sdtrain.train.loop import Trainer, TrainerCallback, TrainingDiverged


class PoisonAt(TrainerCallback):
    def on_step_end(self, trainer, step, loss):
        if step == 3:
            with torch.no_grad():
                next(iter(trainer.adapters.parameters("unet"))).fill_(math.nan)


def test_nan_stops_with_step_group_and_last_save(tmp_path):
    config = write_config(tmp_path, "nan", steps=8)
    with pytest.raises(TrainingDiverged) as error:
        run(config, ["save.every_n_steps=2"], callbacks=[PoisonAt()])
    message = str(error.value)
    assert "at step 4" in message and "unet" in message and "run-step000002.safetensors" in message


def test_init_from_onetrainer_style_input_axis_file(tmp_path):
    """A file in OneTrainer's style (input axis, 1-D dora_scale, fp16, no alpha keys) initialises a run whose
    config says output axis: the file's network is used, its weights loaded exactly, the optimizer fresh."""
    source = run(write_config(tmp_path, "source", steps=3), ["network.decompose_axis=input"])
    tensors = load_file(str(source.result.final_adapter))
    foreign = {}
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            continue  # OneTrainer may omit alpha: loaders then use alpha = rank (our files store alpha = rank)
        foreign[key] = value.flatten().half() if key.endswith(".dora_scale") else value.half()
    path = tmp_path / "onetrainer.safetensors"
    save_file(foreign, str(path))

    cfg = load_config(write_config(tmp_path, "continued", steps=2))
    trainer = Trainer(cfg, init_from=str(path), quiet=True)
    trainer.setup()
    assert trainer.spec.decompose_axis == "input"
    name = next(iter(trainer.adapters.modules))
    module = trainer.adapters.modules[name]
    torch.testing.assert_close(module.magnitude.detach(), foreign[f"{name}.dora_scale"].float(), rtol=0, atol=0)
    torch.testing.assert_close(module.lora_down.weight.detach(), foreign[f"{name}.lora_down.weight"].float(),
                               rtol=0, atol=0)
    assert not trainer.optimizer.state  # fresh optimizer state
    trainer.run()
    assert trainer.result.final_adapter.is_file()

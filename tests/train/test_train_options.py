"""Training options end to end on the tiny SDXL model: gradient checkpointing, save cadence (the wiring of the
other options is in test_wiring.py)."""

from __future__ import annotations

import torch

from helpers_training import run, write_config


def test_gradient_checkpointing_gives_the_same_run(tmp_path):
    plain = run(write_config(tmp_path, "plain", steps=3))
    checkpointed = run(write_config(tmp_path, "ckpt", steps=3), ["train.gradient_checkpointing=true"])
    assert checkpointed.base.unet.is_gradient_checkpointing
    torch.testing.assert_close(torch.tensor(checkpointed.result.losses), torch.tensor(plain.result.losses),
                               rtol=1e-5, atol=1e-6)


def test_saves_every_n_steps_keep_last_and_final(tmp_path):
    trainer = run(write_config(tmp_path, "saves", steps=8), ["save.every_n_steps=2", "save.keep_last=2"])
    names = sorted(p.name for p in (tmp_path / "saves").glob("*.safetensors"))
    assert names == ["run-step000004.safetensors", "run-step000006.safetensors", "run.safetensors"]
    assert trainer.result.final_adapter.name == "run.safetensors"

"""The dry-run plan for real models that are not on disk: counted on the released architectures."""

from __future__ import annotations

import pytest

from helpers_training import write_config
from sdtrain.config import load_config
from sdtrain.train.plan import describe_plan, make_plan


@pytest.mark.parametrize("hub_id,arch,unet_modules", [
    ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 722),  # kohya's count for SDXL attention + ff
    ("runwayml/stable-diffusion-v1-5", "sd15", 192),             # kohya's count for SD1.5 attention + proj + ff
])
def test_dry_run_counts_released_architectures_offline(tmp_path, hub_id, arch, unet_modules):
    config = write_config(tmp_path, "plan")
    cfg = load_config(config, [f"model.path={hub_id}", f"model.arch={arch}", "network.preset=attn-mlp",
                               "network.train_text_encoder=true"])
    plan = make_plan(cfg)
    text = describe_plan(plan, cfg)
    unet_row = next(line for line in plan.network_report.splitlines() if line.startswith("unet"))
    assert f" {unet_modules} (" in unet_row
    assert ("te2" in plan.network_report) == (arch == "sdxl")
    assert "released" in text


def test_plan_shows_samples_ema_and_trackers(tmp_path):
    cfg = load_config(write_config(tmp_path, "plan"), [
        "sample.at_start=true", "sample.every_n_epochs=2", 'sample.prompts=["a", "b"]', "ema.enabled=true",
        "ema.decay=0.99", "ema.every_n_steps=5", "ema.start_step=100", "ema.use_for_samples=true",
        "log.tensorboard=false"])
    text = describe_plan(make_plan(cfg, with_network=False), cfg)
    assert "samples: 2 prompts before the first step, every 2 epochs" in text
    assert ("EMA of the adapter weights: decay 0.99, updated every 5 steps after step 100, used for samples; saved "
            "as run-ema.safetensors") in text
    assert "logs: loss_log.csv\n" in text

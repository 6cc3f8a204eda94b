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


def test_dry_run_shows_the_blocks_and_the_adapter_dropout(tmp_path):
    """Each [[network.blocks]] entry's layers (count per model), rank, alpha and lr; the parameter count follows
    the entries' ranks; the dropout line."""
    from sdtrain.adapters.inject import NetworkSpec, plan_injection
    from sdtrain.train.plan import model_configs

    blocks = ["network.blocks.0.pattern=lora_unet_output_blocks_*", "network.blocks.0.rank=8",
              "network.blocks.0.lr=0", "network.blocks.1.pattern=lora_te2_*", "network.blocks.1.alpha=2",
              "network.blocks.1.lr=5e-5", "network.blocks.2.pattern=lora_unet_nothing_*", "network.blocks.2.rank=1"]
    cfg = load_config(write_config(tmp_path, "plan"), ["model.path=stabilityai/stable-diffusion-xl-base-1.0",
                                                       "model.arch=sdxl", "network.preset=attn-mlp", "network.rank=4",
                                                       "network.train_text_encoder=true", "optimizer.lr=1e-4",
                                                       "network.rank_dropout=0.25", *blocks])
    plan = make_plan(cfg)
    text = describe_plan(plan, cfg)
    unet_config, encoders, _ = model_configs(cfg, "sdxl")
    names = [e for e in plan_injection(unet_config, encoders, "sdxl", NetworkSpec(rank=4, preset="attn-mlp",
                                                                                  train_text_encoder=True))]
    output = [e for e in names if e.kohya_name.startswith("lora_unet_output_blocks_")]
    te2 = [e for e in names if e.kohya_name.startswith("lora_te2_")]
    assert f'0: "lora_unet_output_blocks_*" -> {len(output)} unet: rank 8 alpha 8, lr 0 (frozen)' in text
    assert f'1: "lora_te2_*" -> {len(te2)} te2: rank 4 alpha 2, lr 5e-05' in text
    assert '2: "lora_unet_nothing_*" -> no layer' in text
    assert "adapter dropout (training steps only): network 0, rank 0.25, module 0" in text

    def params(entry, rank):
        fan_in = 1
        for side in entry.weight_shape[1:]:
            fan_in *= side
        return rank * (fan_in + entry.weight_shape[0]) + entry.weight_shape[0]  # A, B and the output magnitude

    want = sum(params(e, 8 if e in output else 4) for e in names)
    assert plan.trainable_params == want

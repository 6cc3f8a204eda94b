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


def test_dry_run_shows_noise_timestep_weight_and_text_settings(tmp_path, capsys):
    from sdtrain.errors import ConfigError
    from sdtrain.train.loop import train

    config = write_config(tmp_path, "plan")
    overrides = ["model.prediction_type=v_prediction", "train.zero_terminal_snr=true", "train.ip_noise_gamma=0.1",
                 "train.multires_noise_iterations=6", "train.timestep_sampling=logit_normal", "train.logit_mean=0.5",
                 "train.timestep_shift=3", "train.debiased_estimation_loss=true", "train.prior_loss_weight=0.5",
                 "model.max_token_length=225", "data.subsets.0.caption_prefix=sks", "data.subsets.0.wildcards=true"]
    train(load_config(config, overrides), dry_run=True)
    out = capsys.readouterr().out
    assert ("noise: multires 6 levels x discount 0.3, input perturbation gamma 0.1, zero-terminal SNR schedule; "
            "timesteps: logit-normal (mean 0.5, std 1), shift 3 in [0, 1000)") in out
    assert "loss: l2, weights: debiased estimation, regularisation images x 0.5" in out
    assert "text: up to 225 tokens per caption and prompt, clip skip 1" in out
    assert 'subset 0 captions: prefix "sks", wildcards' in out
    train(load_config(config, ["model.prediction_type=epsilon", "train.zero_terminal_snr=true"]), dry_run=True)
    assert "warning: train.zero_terminal_snr with an epsilon-prediction model" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="train.scale_v_pred_loss_like_noise_pred"):
        load_config(config, ["model.prediction_type=epsilon", "train.scale_v_pred_loss_like_noise_pred=true"])
    with pytest.raises(ConfigError, match="'train.debiased_estimation_loss'.*infinite at the last timestep"):
        load_config(config, ["model.prediction_type=epsilon", "train.zero_terminal_snr=true",
                             "train.debiased_estimation_loss=true"])
    notes = []
    load_config(config, ["train.logit_std=2", "train.multires_noise_discount=0.5"], notes=notes)
    assert any("train.logit_std = 2 has no effect" in n for n in notes)
    assert any("train.multires_noise_discount = 0.5 has no effect" in n for n in notes)


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

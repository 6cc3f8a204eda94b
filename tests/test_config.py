"""The TOML config: schema keys, validation messages, overrides, resolved dump and generated docs."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from sdtrain.config import (
    config_from_dict,
    config_reference_markdown,
    config_to_dict,
    load_config,
    parse_prompt_line,
    write_resolved_config,
)
from sdtrain.config.schema import Config, iter_keys
from sdtrain.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]

# The key names other parts of sdtrain read; written out by hand so a rename fails here.
EXPECTED_KEYS = """
model.path model.arch model.vae model.config_dir model.prediction_type model.clip_skip model.max_token_length
model.allow_pickle model.revision model.variant
data.resolution data.caption_extension data.min_bucket_side data.max_bucket_side data.bucket_step data.no_upscale
data.cache_latents data.cache_dir data.cache_text_encoder_outputs data.num_workers data.subsets
data.subsets.N.path data.subsets.N.repeats data.subsets.N.is_reg data.subsets.N.caption_extension
data.subsets.N.shuffle_tags data.subsets.N.keep_tokens data.subsets.N.keep_tokens_separator
data.subsets.N.tag_separator data.subsets.N.caption_dropout data.subsets.N.tag_dropout data.subsets.N.flip
data.subsets.N.random_crop data.subsets.N.class_caption data.subsets.N.caption_prefix data.subsets.N.caption_suffix
data.subsets.N.wildcards data.subsets.N.mask_path data.subsets.N.alpha_mask
network.type network.rank network.alpha network.decompose_axis network.detach_norm network.preset network.include
network.exclude network.conv_rank network.conv_alpha network.train_unet network.train_text_encoder network.dropout
network.rank_dropout network.module_dropout network.blocks network.blocks.N.pattern network.blocks.N.rank
network.blocks.N.alpha network.blocks.N.lr
optimizer.type optimizer.lr optimizer.unet_lr optimizer.text_encoder_lr optimizer.text_encoder_2_lr
optimizer.weight_decay optimizer.betas optimizer.eps optimizer.args
scheduler.type scheduler.warmup_steps scheduler.num_cycles scheduler.power
train.max_steps train.epochs train.batch_size train.gradient_accumulation_steps train.max_grad_norm
train.mixed_precision train.gradient_checkpointing train.compile train.seed train.loss train.huber_c train.min_snr_gamma
train.debiased_estimation_loss train.scale_v_pred_loss_like_noise_pred train.prior_loss_weight train.noise_offset
train.multires_noise_iterations train.multires_noise_discount train.ip_noise_gamma train.zero_terminal_snr
train.timestep_sampling train.logit_mean train.logit_std train.timestep_shift train.min_timestep train.max_timestep
train.normalize_masked_loss train.output_dir train.output_name
save.every_n_steps save.every_n_epochs save.keep_last save.dtype save.state_every_n_steps save.keep_last_states
save.target save.targets
sample.every_n_steps sample.every_n_epochs sample.at_start sample.prompts sample.sampler sample.steps
sample.cfg_scale sample.seed
validation.fraction validation.path validation.seed validation.every_n_steps validation.timesteps
validation.batch_size validation.prompts
ema.enabled ema.decay ema.every_n_steps ema.start_step ema.use_for_samples
log.tensorboard log.trackers log.log_dir log.log_every_n_steps
""".split()

MINIMAL = """\
[model]
path = "builtin:tiny-sd15"

[[data.subsets]]
path = "images"

[train]
max_steps = 10
"""


@pytest.fixture
def project(tmp_path):
    """A config folder with an `images` dataset folder; returns a writer for config text."""
    (tmp_path / "images").mkdir()

    def write(text: str = MINIMAL, name: str = "run.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def load_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ---------------------------------------------------------------- schema and example configs


def test_schema_has_exactly_the_documented_keys():
    assert [key for key, _ in iter_keys()] == EXPECTED_KEYS


def _choices(dotted: str):
    return next(f.metadata["kind"] for key, f in iter_keys() if key == dotted).values


def test_choices_come_from_the_modules_that_implement_them():
    import torch

    from sdtrain.adapters.dora import DoRALinear
    from sdtrain.adapters.inject import _meta_unet
    from sdtrain.adapters.presets import PRESETS, unet_preset_paths
    from sdtrain.adapters.spec import AXES, TYPES
    from sdtrain.models.tiny import tiny_configs
    from sdtrain.train.loss import LOSS_KINDS, diffusion_loss
    from sdtrain.train.optim import OPTIMIZER_TYPES, SCHEDULER_TYPES
    from sdtrain.train.sampling import SAMPLERS, sampler_scheduler
    from sdtrain.train.timesteps import TIMESTEP_SAMPLINGS, draw_timesteps

    assert _choices("optimizer.type") is OPTIMIZER_TYPES and _choices("scheduler.type") is SCHEDULER_TYPES
    assert _choices("train.loss") is LOSS_KINDS and _choices("train.timestep_sampling") is TIMESTEP_SAMPLINGS
    assert _choices("network.type") is TYPES and _choices("network.decompose_axis") is AXES
    assert _choices("network.preset") == tuple(PRESETS) and _choices("sample.sampler") == tuple(SAMPLERS)
    # and the owners implement every choice they list
    for kind in LOSS_KINDS:
        diffusion_loss(torch.zeros(1, 2), torch.ones(1, 2), kind)
    for sampling in TIMESTEP_SAMPLINGS:
        draw_timesteps(2, None, 0, 1000, sampling)
    for name in SAMPLERS:
        sampler_scheduler(name, {"num_train_timesteps": 1000})
    unet = _meta_unet(tiny_configs("sd15")[0])
    assert all(unet_preset_paths(unet, preset) for preset in PRESETS)
    for axis in AXES:
        DoRALinear(torch.nn.Linear(8, 8), 2, 2.0, axis=axis)


def test_loading_a_config_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, sdtrain.config; print(sorted(m for m in ('torch', 'numpy', 'diffusers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("name", ["character", "style", "sd15"])
def test_example_configs_load(name, tmp_path):
    cfg = load_config(REPO / "configs" / f"{name}.toml", [f"data.subsets.0.path={tmp_path}"])
    assert cfg.network.type == "dora"
    assert cfg.network.alpha == cfg.network.rank
    assert cfg.optimizer.type == "AdamW8bit" and cfg.optimizer.lr == pytest.approx(1e-4)
    assert cfg.train.mixed_precision == "bf16" and cfg.train.min_snr_gamma == 5
    assert cfg.train.output_dir == str(REPO / "output" / name)
    side = 512 if name == "sd15" else 1024
    assert cfg.data.resolution == [side, side]


def test_character_config_has_community_defaults(tmp_path):
    cfg = load_config(REPO / "configs" / "character.toml", [f"data.subsets.0.path={tmp_path}"])
    assert cfg.model.arch == "sdxl"
    assert cfg.network.rank == 32 and cfg.network.alpha == 32.0
    assert (cfg.scheduler.type, cfg.scheduler.warmup_steps) == ("constant_with_warmup", 100)
    assert cfg.network.train_text_encoder is False and cfg.optimizer.text_encoder_lr == pytest.approx(1e-5)


def test_style_config_shuffles_and_drops_captions(tmp_path):
    subset = load_config(REPO / "configs" / "style.toml", [f"data.subsets.0.path={tmp_path}"]).data.subsets[0]
    assert subset.shuffle_tags is True and subset.caption_dropout == pytest.approx(0.05)


@pytest.mark.parametrize("name", ["character", "style"])
def test_job_configs_plan_their_community_settings(tmp_path, capsys, name):
    """The dry run of each job config on 20 images shows the settings its comments explain: baseline samples
    before training, min-SNR; for styles also long captions, multires noise, samples per epoch and a held-out
    validation loss."""
    from helpers_training import make_dataset

    from sdtrain.train.loop import train

    images = make_dataset(tmp_path / "images", count=20)
    train(load_config(REPO / "configs" / f"{name}.toml", [f"data.subsets.0.path={images}"]), dry_run=True)
    out = capsys.readouterr().out
    assert "before the first step" in out and "min-SNR gamma 5" in out
    if name == "style":
        assert "multires 6 levels x discount 0.3" in out and "up to 225 tokens" in out
        assert "samples: 2 prompts before the first step, every epoch" in out
        assert "validation: 1 image (held out 0.05 of the training images" in out
    else:
        assert "validation:" not in out


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "text, unknown, suggestion",
    [
        ('[netwrok]\nrank = 4\n', "netwrok", "network"),
        ('[network]\nrnak = 4\n', "network.rnak", "network.rank"),
        ('[scheduler]\nlr = 1e-4\n', "scheduler.lr", "optimizer.lr"),
        ('[save]\nlearning_rate = 1e-4\n', "save.learning_rate", "optimizer.lr"),
        ('[network]\nnetwork_dim = 8\n', "network.network_dim", "network.rank"),
        ('[sample]\nevery_n_step = 5\n', "sample.every_n_step", "sample.every_n_steps"),
    ],
)
def test_unknown_key_names_dotted_path_and_suggestion(project, text, unknown, suggestion):
    path = project(MINIMAL + text)
    message = load_error(path)
    assert f"unknown key '{unknown}' in " in message
    assert str(path.name) in message
    assert f"did you mean '{suggestion}'?" in message


def test_unknown_key_inside_a_subset(project):
    text = MINIMAL.replace('path = "images"', 'path = "images"\ncaptoin_extension = ".txt"')
    message = load_error(project(text))
    assert "unknown key 'data.subsets.0.captoin_extension'" in message
    assert "did you mean 'data.subsets.0.caption_extension'?" in message


def test_unknown_key_without_a_close_match_lists_the_section_keys(project):
    message = load_error(project(MINIMAL + "[scheduler]\nzzzz = 1\n"))
    assert "unknown key 'scheduler.zzzz'" in message
    assert "type, warmup_steps, num_cycles, power" in message


def test_unknown_key_from_an_override_points_at_the_override(project):
    message = load_error(project(), ["network.alhpa=8"])
    assert "unknown key 'network.alhpa' in --set network.alhpa=8; did you mean 'network.alpha'?" in message


# ---------------------------------------------------------------- types, ranges, choices, required keys


@pytest.mark.parametrize(
    "override, fragments",
    [
        ('train.batch_size="two"', ["'train.batch_size'", "wrong type", '"two" (string)', "an integer >= 1"]),
        ("train.max_steps=true", ["'train.max_steps'", "wrong type", "true (boolean)", "an integer >= 1"]),
        ("network.rank=0", ["'network.rank'", "out of range", "0 (integer)", "an integer in [1, 2048]"]),
        ("data.subsets.0.caption_dropout=1.5", ["'data.subsets.0.caption_dropout'", "a number in [0, 1]"]),
        ("network.alpha=0", ["'network.alpha'", "a finite number > 0"]),
        ("data.resolution=[1000, 1024]", ["'data.resolution'", "multiples of 64"]),
        ("optimizer.betas=[0.9]", ["'optimizer.betas'", "a list of two numbers"]),
        ('optimizer.type="adamw8bit"', ["'optimizer.type'", '"AdamW", "AdamW8bit"', 'did you mean "AdamW8bit"?']),
        ('network.preset="attention"', ["'network.preset'", '"attn", "attn-mlp", "full"']),
        ('save.targets=["comfy"]', ["'save.targets'", '"comfyui", "forge", "comfyui-fixed"']),
        ('save.target="sdnext"', ["'save.target'", '"comfyui", "forge", "lycoris", "a1111", "portable"']),
        ('model="x"', ["'model'", "must be a table ([model])"]),
    ],
)
def test_bad_values_name_key_and_what_it_accepts(project, override, fragments):
    message = load_error(project(), [override])
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_all_problems_are_reported_together(project):
    message = load_error(project(), ["network.rank=0", "train.seed=-1", "network.rnak=3"])
    assert message.startswith("3 problems in ")
    assert "'network.rank'" in message and "'train.seed'" in message and "'network.rnak'" in message


def test_missing_model_path_gives_an_example(project):
    message = load_error(project(MINIMAL.replace('path = "builtin:tiny-sd15"', 'arch = "sd15"')))
    assert "missing required key 'model.path'" in message
    assert '[model]\npath = "' in message


def test_missing_subsets_and_steps_are_named(project):
    message = load_error(project('[model]\npath = "builtin:tiny-sd15"\n'))
    assert "missing required key 'data.subsets'" in message and "[[data.subsets]]" in message
    message = load_error(project(MINIMAL.replace("max_steps = 10", "batch_size = 1")))
    assert "'train.max_steps' (or 'train.epochs')" in message


def test_missing_subset_folder_names_the_resolved_path(project, tmp_path):
    message = load_error(project(MINIMAL.replace('"images"', '"no_such_folder"')))
    assert "'data.subsets.0.path'" in message
    assert str(tmp_path / "no_such_folder") in message and "does not exist" in message


def test_subset_without_path_is_named(project):
    message = load_error(project(MINIMAL + "[[data.subsets]]\nrepeats = 2\n"))
    assert "missing required key 'data.subsets.1.path'" in message and "[[data.subsets]]" in message


def test_model_path_checks(project, tmp_path):
    assert load_config(project(), ["model.path=org/some-model"]).model.path == "org/some-model"
    message = load_error(project(), ["model.path=models/sdxl.safetensors"])
    assert "'model.path'" in message and str(tmp_path / "models" / "sdxl.safetensors") in message
    message = load_error(project(), ["model.path=builtin:tiny-sd3"])
    assert '"builtin:tiny-sd15", "builtin:tiny-sdxl"' in message
    (tmp_path / "old.ckpt").write_bytes(b"")
    message = load_error(project(), ["model.path=old.ckpt"])
    assert "'model.path'" in message and "model.allow_pickle = true" in message
    cfg = load_config(project(), ["model.path=old.ckpt", "model.allow_pickle=true"])
    assert cfg.model.path == str(tmp_path / "old.ckpt")


def test_cross_key_rules_name_the_keys(project):
    message = load_error(project(), ["scheduler.warmup_steps=5"])
    assert "'scheduler.warmup_steps'" in message and '"constant_with_warmup"' in message
    message = load_error(project(), ["data.cache_text_encoder_outputs=true", "network.train_text_encoder=true"])
    assert "'data.cache_text_encoder_outputs'" in message
    message = load_error(project(), ["sample.every_n_steps=5"])
    assert "'sample.every_n_steps'" in message and "sample.prompts" in message
    message = load_error(project(), ['sample.prompts=["a cat --w 500"]'])
    assert "'sample.prompts.0'" in message and "--w" in message
    message = load_error(project(), ["data.resolution=128"])
    assert "'data.resolution'" in message and "data.min_bucket_side" in message
    message = load_error(project(), ["train.min_timestep=500", "train.max_timestep=400"])
    assert "'train.min_timestep'" in message


def test_file_problems_are_config_errors_with_exit_code_2(project, tmp_path):
    message = load_error(project("[model\npath = 1\n"))
    assert "run.toml is not valid TOML" in message
    message = load_error(tmp_path / "missing.toml")
    assert "config file not found" in message and "missing.toml" in message
    assert issubclass(ConfigError, UserError) and ConfigError.exit_code == 2


# ---------------------------------------------------------------- resolution of defaults and paths


def test_derived_defaults(project, tmp_path):
    cfg = load_config(project(), ["network.rank=8", "optimizer.lr=3e-4", "optimizer.text_encoder_lr=1e-5"])
    assert cfg.network.alpha == 8.0 and cfg.network.conv_rank == 8 and cfg.network.conv_alpha == 8.0
    assert cfg.optimizer.unet_lr == pytest.approx(3e-4)
    assert cfg.optimizer.text_encoder_2_lr == pytest.approx(1e-5)
    assert cfg.model.arch == "sd15" and cfg.data.resolution == [512, 512]
    assert cfg.data.subsets[0].caption_extension == ".txt" and cfg.data.subsets[0].repeats is None
    assert cfg.train.output_name == "run" and cfg.train.output_dir == str(tmp_path / "output")
    assert cfg.data.cache_dir == str(tmp_path / "output" / "cache")
    assert cfg.log.log_dir == str(tmp_path / "output" / "logs")
    assert cfg.sample.seed == cfg.train.seed


def test_conv_alpha_keeps_the_linear_scale(project):
    cfg = load_config(project(), ["network.rank=16", "network.alpha=8", "network.conv_rank=4"])
    assert cfg.network.conv_alpha == pytest.approx(4 * 8 / 16)


def test_hub_model_keeps_auto_arch_and_resolution(project):
    cfg = load_config(project(), ["model.path=org/model"])
    assert cfg.model.arch == "auto" and cfg.data.resolution == "auto"


def test_relative_paths_are_read_from_the_config_folder(project, tmp_path, monkeypatch):
    path = project()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert cfg.data.subsets[0].path == str(tmp_path / "images")


# ---------------------------------------------------------------- overrides


def test_overrides_nested_indexed_and_lists(project, tmp_path):
    (tmp_path / "reg").mkdir()
    cfg = load_config(project(), [
        "network.rank=32",
        "data.subsets.0.repeats=3",
        "data.subsets.1.path=reg",
        "data.subsets.1.is_reg=true",
        'sample.prompts=["a cat --w 64 --h 64", "a dog"]',
        "sample.every_n_steps=5",
        "data.resolution=[256, 320]",
        "optimizer.args={ min_8bit_size = 16 }",
        "train.output_name=2024",
    ])
    assert cfg.network.rank == 32
    assert cfg.data.subsets[0].repeats == 3
    assert cfg.data.subsets[1].path == str(tmp_path / "reg") and cfg.data.subsets[1].is_reg is True
    assert cfg.sample.prompts == ["a cat --w 64 --h 64", "a dog"]
    assert cfg.data.resolution == [256, 320]
    assert cfg.optimizer.args == {"min_8bit_size": 16}
    assert cfg.train.output_name == "2024"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("network.rank", "expects key.path=value"),
        ("data.subsets.5.repeats=2", "has 1 entries"),
        ("data.subsets.first.repeats=2", "index it with a number"),
        ("train.max_steps.value=3", "is a single value"),
    ],
)
def test_bad_overrides(project, override, fragment):
    assert fragment in load_error(project(), [override])


# ---------------------------------------------------------------- resolved dump


def test_resolved_dump_reloads_equal(project, tmp_path):
    data = tomllib.loads(MINIMAL)
    tricky = 'a "quoted" \\ back\\slash,\ttab, ünïcødé ✓, \x7f --n ugly --w 64 --h 64 --d 3 --l 4.5 --s 2'
    data["network"] = {"include": ["re:.*attn.*"], "exclude": ["*ff*"]}
    data["sample"] = {"prompts": [tricky], "every_n_steps": 2}
    data["optimizer"] = {"args": {"d_coef": 0.5, "flags": [1, 2], "nested": {"a": True}, "odd key": "x"},
                         "betas": [0.9, 0.99], "lr": 1e-5}
    data["data"]["subsets"][0]["class_caption"] = "a photo\nof x"
    cfg = config_from_dict(data, tmp_path, stem="run")
    out = tmp_path / "out" / "run.resolved.toml"
    write_resolved_config(cfg, out)
    assert tomllib.loads(out.read_text(encoding="utf-8")) == config_to_dict(cfg)
    assert load_config(out) == cfg
    assert cfg.sample.prompts == [tricky]
    assert not [p for p in os.listdir(out.parent) if p.endswith(".tmp")]


def test_config_from_dict_matches_load_config(project, tmp_path):
    path = project()
    data = tomllib.loads(path.read_text())
    assert config_from_dict(data, tmp_path, stem="run") == load_config(path)
    assert data == tomllib.loads(path.read_text())  # the caller's dict is not modified


def test_default_config_dataclass_matches_documented_defaults():
    cfg = Config()
    assert (cfg.network.type, cfg.network.rank, cfg.network.preset, cfg.network.decompose_axis) == \
        ("dora", 16, "attn-mlp", "output")
    assert (cfg.save.target, cfg.save.targets) == ("comfyui", None)
    assert cfg.data.caption_extension == ".txt" and cfg.data.subsets == []


# ---------------------------------------------------------------- reference doc


def test_reference_mentions_every_key():
    text = config_reference_markdown()
    for key in EXPECTED_KEYS:
        assert f"| `{key}` |" in text, key


def test_docs_config_md_is_up_to_date():
    path = REPO / "docs" / "config.md"
    assert path.read_text(encoding="utf-8") == config_reference_markdown(), \
        "docs/config.md is stale: run `python -m sdtrain.config > docs/config.md`"


# ---------------------------------------------------------------- prompt lines


def test_parse_prompt_line_reads_every_option():
    parsed = parse_prompt_line("a cat, sitting --n blurry, low quality --w 768 --h 512 --d 7 --l 6.5 --s 25")
    assert parsed == {"prompt": "a cat, sitting", "negative": "blurry, low quality", "width": 768, "height": 512,
                      "seed": 7, "cfg": 6.5, "steps": 25}


def test_parse_prompt_line_leaves_unset_options_none():
    assert parse_prompt_line("  just a prompt  ") == {"prompt": "just a prompt", "negative": None, "width": None,
                                                      "height": None, "seed": None, "cfg": None, "steps": None}
    assert parse_prompt_line("x--w not an option")["prompt"] == "x--w not an option"


@pytest.mark.parametrize(
    "line, fragment",
    [("a cat --q 3", "unknown option --q"), ("a cat --w 100", "multiple of 8"), ("a cat --s x", "--s 'x'"),
     ("--w 64", "prompt text"), ("a --s 0", "step count")],
)
def test_parse_prompt_line_errors(line, fragment):
    with pytest.raises(ValueError) as info:
        parse_prompt_line(line)
    assert fragment in str(info.value)


def test_adapter_dropout_and_blocks_are_validated(project):
    cfg = load_config(project(MINIMAL + """
[network]
rank = 4
rank_dropout = 0.25
[[network.blocks]]
pattern = "lora_unet_up_blocks_*"
rank = 8
lr = 0
"""))
    assert cfg.network.rank_dropout == 0.25
    assert (cfg.network.blocks[0].pattern, cfg.network.blocks[0].rank, cfg.network.blocks[0].lr) == \
        ("lora_unet_up_blocks_*", 8, 0.0)
    assert "network.dropout" in load_error(project(MINIMAL + "[network]\ndropout = 1.0\n"))
    assert "network.rank_dropout" in load_error(project(MINIMAL + "[network]\nrank_dropout = 1.0\n"))
    assert "network.module_dropout" in load_error(project(MINIMAL + "[network]\nmodule_dropout = 1.5\n"))
    assert "network.blocks.0" in load_error(project(MINIMAL + '[[network.blocks]]\npattern = "lora_unet_*"\n'))
    assert "network.blocks.0.pattern" in load_error(project(MINIMAL + '[[network.blocks]]\npattern = "re:(("\nlr = 1e-4\n'))
    assert "network.blocks.0.pattern" in load_error(project(MINIMAL + '[[network.blocks]]\nrank = 4\n'))
    assert "network.blocks.0.lr" in load_error(project(MINIMAL + '[[network.blocks]]\npattern = "x"\nlr = -1\n'))
    overridden = load_config(project(), ["network.blocks.0.pattern=lora_unet_mid_block_*", "network.blocks.0.lr=0"])
    assert overridden.network.blocks[0].pattern == "lora_unet_mid_block_*"

"""kohya names: option names as top-level keys and in --set, and kohya dataset configs (--dataset-config)."""

from __future__ import annotations

import pytest

from helpers_training import SeenBatches, make_dataset, write_half_masks
from sdtrain.cli import main
from sdtrain.config import load_config
from sdtrain.errors import ConfigError
from sdtrain.train.loop import Trainer

BASE = """
[model]
path = "builtin:tiny-sdxl"
[data]
resolution = 64
min_bucket_side = 64
max_bucket_side = 128
[[data.subsets]]
path = "{data}"
[train]
max_steps = 3
mixed_precision = "no"
output_dir = "out"
[save]
targets = []
[log]
tensorboard = false
"""


@pytest.fixture
def config(tmp_path):
    make_dataset(tmp_path / "data", 2)

    def write(text: str = "", base: str = BASE, name: str = "c.toml"):
        path = tmp_path / name
        path.write_text(text + base.format(data=tmp_path / "data"))
        return path

    return write


def test_set_network_dim_sets_network_rank_with_a_note(config):
    notes = []
    cfg = load_config(config(), ["network_dim=8"], notes=notes)
    assert cfg.network.rank == 8 and cfg.network.alpha == 8.0
    assert notes == ["--set network_dim=8: kohya option network_dim read as network.rank = 8"]


def test_kohya_options_at_the_top_level_with_converted_values(config):
    notes = []
    cfg = load_config(config("""
network_dim = 8
network_alpha = 4
learning_rate = 3e-4
unet_lr = 2e-4
text_encoder_lr = 1e-5
max_train_steps = 7
train_batch_size = 2
gradient_accumulation_steps = 2
gradient_checkpointing = true
resolution = "128,64"
save_every_n_steps = 5
save_precision = "float"
mixed_precision = "bf16"
caption_extension = ".caption"
shuffle_caption = true
keep_tokens = 2
noise_offset = 0.05
min_snr_gamma = 5
clip_skip = 2
optimizer_type = "adamw"
optimizer_args = ["weight_decay=0.1", "betas=0.9,0.99"]
lr_scheduler = "cosine"
lr_warmup_steps = 2
seed = 7
output_name = "kohya_run"
v_parameterization = true
""", base=BASE.replace("max_steps = 3\n", "").replace('mixed_precision = "no"\n', "").replace(
        "resolution = 64\n", "")), notes=notes)
    assert cfg.network.rank == 8 and cfg.network.alpha == 4.0
    assert (cfg.optimizer.lr, cfg.optimizer.unet_lr, cfg.optimizer.text_encoder_lr) == (3e-4, 2e-4, 1e-5)
    assert cfg.optimizer.type == "AdamW" and cfg.optimizer.args == {"weight_decay": 0.1, "betas": [0.9, 0.99]}
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.gradient_accumulation_steps) == (7, 2, 2)
    assert cfg.train.gradient_checkpointing and cfg.train.mixed_precision == "bf16" and cfg.train.seed == 7
    assert (cfg.train.noise_offset, cfg.train.min_snr_gamma) == (0.05, 5.0)
    assert cfg.data.resolution == [128, 64]  # kohya's "W,H"
    assert cfg.save.every_n_steps == 5 and cfg.save.dtype == "fp32"  # kohya's "float"
    assert cfg.data.caption_extension == ".caption" and cfg.data.subsets[0].caption_extension == ".caption"
    assert cfg.data.subsets[0].shuffle_tags and cfg.data.subsets[0].keep_tokens == 2
    assert cfg.model.clip_skip == 2 and cfg.model.prediction_type == "v_prediction"
    assert cfg.scheduler.type == "cosine" and cfg.scheduler.warmup_steps == 2
    assert cfg.train.output_name == "kohya_run"
    assert len(notes) == 26
    assert any(n.endswith('c.toml: kohya option save_precision read as save.dtype = "fp32" (kohya "float")')
               for n in notes)
    assert any(n.endswith('c.toml: kohya option resolution read as data.resolution = [128, 64] (kohya "128,64")')
               for n in notes)
    assert any(n.endswith("shuffle_caption read as data.subsets.N.shuffle_tags = true on every subset that does "
                          "not set it") for n in notes)


def test_kohya_option_and_its_sdtrain_key_together_fail(config):
    with pytest.raises(ConfigError, match=r"sets both network_dim \(kohya's name for network.rank\) and network.rank"):
        load_config(config("network_dim = 8\n", base=BASE + "[network]\nrank = 4\n"))


def test_a_subset_value_wins_over_a_kohya_caption_option(config):
    cfg = load_config(config("keep_tokens = 2\n", base=BASE.replace('path = "{data}"', 'path = "{data}"\nkeep_tokens = 1')))
    assert cfg.data.subsets[0].keep_tokens == 1
    cfg = load_config(config(), ["keep_tokens=3"])  # --set overrides every subset
    assert cfg.data.subsets[0].keep_tokens == 3


def test_bad_kohya_values_name_the_option(config):
    with pytest.raises(ConfigError, match=r"'network.rank' in --set network_dim=abc has the wrong type"):
        load_config(config(), ["network_dim=abc"])
    with pytest.raises(ConfigError, match=r"'network.rank' in \S*c.toml \(kohya network_dim\) is out of range"):
        load_config(config("network_dim = 0\n"))
    with pytest.raises(ConfigError, match='kohya resolution "big"'):
        load_config(config(), ["resolution=big"])
    with pytest.raises(ConfigError, match=r"did you mean 'network.rank'"):  # a kohya name inside a section
        load_config(config(base=BASE + "[network]\nnetwork_dim = 4\n"))


def test_kohya_network_dropout_and_network_args(config):
    notes = []
    cfg = load_config(config('network_dropout = 0.1\nnetwork_args = ["rank_dropout=0.25", "module_dropout=0.05", '
                             '"conv_dim=2"]\n'), notes=notes)
    network = cfg.network
    assert (network.dropout, network.rank_dropout, network.module_dropout, network.conv_rank) == (0.1, 0.25, 0.05, 2)
    assert any(n.endswith("kohya network_args rank_dropout read as network.rank_dropout = 0.25") for n in notes)
    assert load_config(config(), ["network_dropout=0.2"]).network.dropout == 0.2
    with pytest.raises(ConfigError, match=r"network_args entry down_lr_weight .* \[\[network.blocks\]\]"):
        load_config(config('network_args = ["down_lr_weight=1,0.5,0.5"]\n'))
    with pytest.raises(ConfigError, match=r"network_args entry dora_wd"):
        load_config(config('network_args = ["dora_wd=True"]\n'))
    with pytest.raises(ConfigError, match=r"out of range"):
        load_config(config('network_args = ["module_dropout=2"]\n'))
    with pytest.raises(ConfigError, match=r"sets both network_args rank_dropout"):
        load_config(config('network_args = ["rank_dropout=0.1"]\n', base=BASE + "[network]\nrank_dropout = 0.2\n"))


# ---------------------------------------------------------------- dataset configs

def write_dataset(tmp_path, text: str, name: str = "dataset.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_dataset_config_subsets_with_kohya_fallbacks(config, tmp_path):
    make_dataset(tmp_path / "images" / "10_alice", 2)
    make_dataset(tmp_path / "reg", 2)
    dataset = write_dataset(tmp_path, """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
enable_bucket = true
color_aug = false

[[datasets]]
resolution = [128, 128]
batch_size = 2
keep_tokens = 2
min_bucket_reso = 64
max_bucket_reso = 256

  [[datasets.subsets]]
  image_dir = "images/10_alice"
  class_tokens = "alice woman"
  num_repeats = 4
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "images/10_alice"
  keep_tokens = 3

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  class_tokens = "woman"
  caption_dropout_rate = 0.1
""")
    notes = []
    cfg = load_config(config(), ["train.max_steps=5"], dataset_config=dataset, notes=notes)
    first, second, reg = cfg.data.subsets
    assert first.path == str(tmp_path / "images" / "10_alice")  # relative to the dataset file
    assert (first.repeats, first.class_caption, first.flip, first.keep_tokens) == (4, "alice woman", True, 2)
    assert first.shuffle_tags and first.caption_extension == ".txt"
    assert second.repeats == 1  # kohya never reads the repeats from the folder name here
    assert second.keep_tokens == 3 and not second.flip
    assert reg.is_reg and reg.class_caption == "woman" and reg.caption_dropout == 0.1 and reg.keep_tokens == 2
    assert cfg.data.resolution == [128, 128] and cfg.train.batch_size == 2
    assert (cfg.data.min_bucket_side, cfg.data.max_bucket_side) == (64, 256)
    assert cfg.train.max_steps == 5
    assert "dataset.toml: kohya dataset config read as 3 data.subsets (image_dir -> data.subsets.N.path" in notes[0]
    assert notes[1].endswith("dataset.toml: ignored kohya keys at their default values (no sdtrain equivalent): "
                             "color_aug")
    assert notes[2].endswith("c.toml: its 1 [[data.subsets]] are replaced by the dataset config's")


def test_dataset_config_refuses_what_sdtrain_cannot_do(config, tmp_path):
    make_dataset(tmp_path / "images", 1)
    cases = {
        'color_aug = true': "color_aug = true has no sdtrain equivalent",
        'metadata_file = "meta.json"': "fine-tuning datasets",
        'num_repeat = 2': "unknown kohya dataset key 'num_repeat'",
    }
    for line, message in cases.items():
        dataset = write_dataset(tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "images"\n{line}\n')
        with pytest.raises(ConfigError, match=message):
            load_config(config(), dataset_config=dataset)
    dataset = write_dataset(tmp_path, '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "images"\n'
                                      '[[datasets]]\nresolution = 128\n[[datasets.subsets]]\nimage_dir = "images"\n')
    with pytest.raises(ConfigError, match="datasets differ in resolution"):
        load_config(config(), dataset_config=dataset)
    dataset = write_dataset(tmp_path, '[general]\nenable_bucket = false\n[[datasets]]\n[[datasets.subsets]]\n'
                                      'image_dir = "images"\n')
    with pytest.raises(ConfigError, match="enable_bucket = false"):
        load_config(config(), dataset_config=dataset)


def test_kohya_masked_loss_reads_conditioning_masks_and_alpha_masks(config, tmp_path):
    """masked_loss = true: conditioning_data_dir (relative to the dataset file, per subset only) is the subset's
    mask_path and the loss is weighted as kohya's (train.normalize_masked_loss = false); alpha_mask as an option
    reaches every subset that sets neither its own nor conditioning masks; explicit sdtrain keys win; misuse
    names the fix."""
    make_dataset(tmp_path / "images", 2)
    make_dataset(tmp_path / "other", 2)
    write_half_masks(tmp_path / "masks", ["img0", "img1"])
    dataset = write_dataset(tmp_path, """
[[datasets]]
  [[datasets.subsets]]
  image_dir = "images"
  conditioning_data_dir = "masks"
  [[datasets.subsets]]
  image_dir = "other"
  alpha_mask = false
""")
    notes = []
    cfg = load_config(config("masked_loss = true\nalpha_mask = true\n"), dataset_config=dataset, notes=notes)
    masked, other = cfg.data.subsets
    assert masked.mask_path == str(tmp_path / "masks") and not masked.alpha_mask  # kohya: masks over alpha
    assert other.mask_path is None and not other.alpha_mask  # the subset's own value wins
    assert cfg.train.normalize_masked_loss is False
    assert any("kohya masked_loss = true read as train.normalize_masked_loss = false" in n for n in notes)
    assert "conditioning_data_dir -> data.subsets.N.mask_path" in " ".join(notes)

    # alpha_mask alone (no masked_loss): kohya still multiplies by the mask, unnormalised
    notes = []
    cfg = load_config(config("alpha_mask = true\n"), notes=notes)
    assert cfg.data.subsets[0].alpha_mask and cfg.train.normalize_masked_loss is False
    assert any("weighted as kohya does: train.normalize_masked_loss = false" in n for n in notes)
    cfg = load_config(config(), ["alpha_mask=true"])
    assert cfg.data.subsets[0].alpha_mask and cfg.train.normalize_masked_loss is False
    cfg = load_config(config("alpha_mask = true\n"), ["train.normalize_masked_loss=true"])
    assert cfg.train.normalize_masked_loss is True
    cfg = load_config(config(), ["data.subsets.0.alpha_mask=true"])  # sdtrain's own key: sdtrain's default
    assert cfg.train.normalize_masked_loss is True

    with pytest.raises(ConfigError, match="conditioning_data_dir is read .* only with kohya's masked_loss = true"):
        load_config(config(), dataset_config=dataset)
    with pytest.raises(ConfigError, match="masked_loss must be true or false"):
        load_config(config('masked_loss = "yes"\n'), dataset_config=dataset)
    with pytest.raises(ConfigError, match="sets both masked_loss"):
        load_config(config("masked_loss = true\n[train]\nnormalize_masked_loss = true\n", base=BASE.replace(
            "[train]\n", "")), dataset_config=dataset)
    general = write_dataset(tmp_path, '[general]\nalpha_mask = true\n[[datasets]]\n[[datasets.subsets]]\n'
                                      'image_dir = "images"\n', name="general.toml")
    with pytest.raises(ConfigError, match="unknown kohya dataset key 'alpha_mask'"):  # per subset only, as kohya
        load_config(config(), dataset_config=general)


def test_kohya_masked_run_equals_the_sdtrain_config_it_reads_as(config, tmp_path):
    """A 3-step run from kohya's masked_loss + conditioning_data_dir logs exactly the losses of the sdtrain config
    it is read as (mask_path, normalize_masked_loss = false), and other losses than sdtrain's default weighting:
    the masks and the weighting reach the loss."""
    images = make_dataset(tmp_path / "images", 2)
    write_half_masks(tmp_path / "masks", ["img0", "img1"])
    dataset = write_dataset(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "images"\n'
                                      'conditioning_data_dir = "masks"\n')
    losses = {}
    for name, overrides, kohya in (
            ("kohya", [], True),
            ("native", [f"data.subsets.0.path={images}", f"data.subsets.0.mask_path={tmp_path / 'masks'}",
                        "train.normalize_masked_loss=false"], False),
            ("normalized", [f"data.subsets.0.path={images}", f"data.subsets.0.mask_path={tmp_path / 'masks'}"],
             False)):
        cfg = load_config(config("masked_loss = true\n" if kohya else "", name=f"{name}.toml"),
                          [f"train.output_name={name}", "save.dtype=fp32"] + overrides,
                          dataset_config=dataset if kohya else None)
        trainer = Trainer(cfg, quiet=True)
        result = trainer.run()
        assert all(r.mask is not None for r in trainer.plan.dataset.records)
        losses[name] = result.losses
    assert losses["kohya"] == losses["native"]
    assert all(a < b for a, b in zip(losses["kohya"], losses["normalized"]))  # mask mean 0.25 < 1


def test_enable_bucket_false_trains_one_square_bucket(config, tmp_path):
    make_dataset(tmp_path / "images", 1)
    dataset = write_dataset(tmp_path, '[general]\nenable_bucket = false\nresolution = 64\n[[datasets]]\n'
                                      '[[datasets.subsets]]\nimage_dir = "images"\n')
    cfg = load_config(config(), dataset_config=dataset)
    assert (cfg.data.resolution, cfg.data.min_bucket_side, cfg.data.max_bucket_side) == ([64, 64], 64, 64)


def test_a_kohya_dataset_config_trains(config, tmp_path, capsys):
    """A short real run on the tiny SDXL model with its subsets from a kohya dataset config."""
    images = make_dataset(tmp_path / "images" / "3_shapes", 3)
    for caption in images.glob("img2.txt"):
        caption.unlink()  # trains with its class_tokens caption
    dataset = write_dataset(tmp_path, """
[general]
resolution = 64
batch_size = 2
[[datasets]]
  [[datasets.subsets]]
  image_dir = "images/3_shapes"
  num_repeats = 2
  class_tokens = "shape"
""")
    cfg = load_config(config(), ["save.dtype=fp32"], dataset_config=dataset)
    seen = SeenBatches()
    trainer = Trainer(cfg, quiet=True, callbacks=[seen])
    result = trainer.run()
    records = trainer.plan.dataset.records
    assert [r.repeats for r in records] == [2, 2, 2] and trainer.plan.batch_size == 2
    assert {r.path.name: r.caption for r in records}["img2.png"] == "shape"
    assert trainer.plan.dataset.notes == [
        f'subset 0: repeats = 2 overrides the 3 repeats of folder "3_shapes" ({images})']
    assert result.steps == 3 and result.final_adapter.is_file()
    assert len(seen.seen) == 3 and all(len(batch) == 2 for _, batch in seen.seen)

    # the same through the command line, with its notes
    code = main(["train", str(config(name="cli.toml")), "--dataset-config", str(dataset),
                 "--set", "train.max_steps=1", "--set", "train.output_name=cli"])
    captured = capsys.readouterr()
    assert code == 0
    assert f"note: {dataset}: kohya dataset config read as 1 data.subsets" in captured.err
    assert (tmp_path / "out" / "cli.safetensors").is_file()


def test_kohya_noise_timestep_and_caption_options(config, tmp_path):
    cfg = load_config(config("""
multires_noise_iterations = 6
multires_noise_discount = 0.4
ip_noise_gamma = 0.1
zero_terminal_snr = true
v_parameterization = true
debiased_estimation_loss = true
scale_v_pred_loss_like_noise_pred = true
prior_loss_weight = 0.5
min_timestep = 100
max_timestep = 900
max_token_length = 225
caption_prefix = "sks,"
caption_suffix = ", best"
enable_wildcard = true
"""))
    t = cfg.train
    assert (t.multires_noise_iterations, t.multires_noise_discount, t.ip_noise_gamma) == (6, 0.4, 0.1)
    assert t.zero_terminal_snr and t.debiased_estimation_loss and t.scale_v_pred_loss_like_noise_pred
    assert (t.prior_loss_weight, t.min_timestep, t.max_timestep) == (0.5, 100, 900)
    assert cfg.model.max_token_length == 225 and cfg.model.prediction_type == "v_prediction"
    subset = cfg.data.subsets[0]
    assert (subset.caption_prefix, subset.caption_suffix, subset.wildcards) == ("sks,", ", best", True)
    with pytest.raises(ConfigError, match="model.max_token_length"):
        load_config(config("max_token_length = 100\n"))
    dataset = write_dataset(tmp_path, '[general]\nenable_wildcard = true\ncaption_prefix = "p"\n[[datasets]]\n'
                                      '[[datasets.subsets]]\nimage_dir = "data"\ncaption_suffix = "s"\n')
    subset = load_config(config(), dataset_config=dataset).data.subsets[0]
    assert (subset.caption_prefix, subset.caption_suffix, subset.wildcards) == ("p", "s", True)

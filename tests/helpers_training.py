"""Helpers for tests that run the real trainer on the tiny SDXL model (a learnable flat-colour dataset)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sdtrain.config import load_config
from sdtrain.train.loop import Trainer


def make_dataset(folder, count=4):
    folder.mkdir(parents=True)
    colours = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (240, 240, 240), (20, 20, 20), (200, 200, 0)]
    for i in range(count):
        Image.new("RGB", (64, 64), colours[i % 6]).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"square {i}, colour {i}, flat, demo")
    return folder


def write_config(tmp_path, name: str, count: int = 4, steps: int = 40, extra: str = "") -> str:
    data = tmp_path / "data"
    if not data.exists():
        make_dataset(data, count)
    text = f"""
[model]
path = "builtin:tiny-sdxl"
[data]
resolution = 64
min_bucket_side = 64
max_bucket_side = 128
cache_dir = "{tmp_path / 'cache'}"
[[data.subsets]]
path = "{data}"
shuffle_tags = true
keep_tokens = 1
caption_dropout = 0.2
flip = true
[network]
rank = 4
preset = "attn"
[optimizer]
type = "AdamW8bit"
lr = 2e-3
[train]
max_steps = {steps}
batch_size = 1
mixed_precision = "no"
seed = 3
output_dir = "{tmp_path / name}"
output_name = "run"
[save]
dtype = "fp32"
state_every_n_steps = 5
keep_last_states = 2
targets = []
[log]
tensorboard = false
{extra}
"""
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)


def run(config, overrides=(), resume=None, stop_at=None, monkeypatch=None):
    cfg = load_config(config, list(overrides))
    trainer = Trainer(cfg, resume=resume, quiet=True)
    if stop_at is not None:
        original = Trainer.after_step

        def interrupting(self, per_epoch):
            original(self, per_epoch)
            if self.global_step == stop_at:
                raise KeyboardInterrupt

        monkeypatch.setattr(Trainer, "after_step", interrupting)
        with pytest.raises(KeyboardInterrupt):
            trainer.run()
        monkeypatch.setattr(Trainer, "after_step", original)
        return trainer
    trainer.run()
    return trainer


def adapter_tensors(trainer):
    return {k: v.detach().clone() for k, v in trainer.adapters.trainable_state_dict().items()}


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def loss_log(trainer):
    return (trainer.output_dir / "loss_log.csv").read_text()

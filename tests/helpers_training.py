"""Helpers for tests that run the real trainer on the tiny models (a learnable flat-colour dataset)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sdtrain.config import load_config
from sdtrain.train.interrupt import TrainingInterrupted
from sdtrain.train.loop import Trainer, TrainerCallback

COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (240, 240, 240), (20, 20, 20), (200, 200, 0)]
NAMES = ["red", "blue", "green", "white", "black", "yellow"]


def make_dataset(folder, count=4, size=64):
    """`count` flat-colour images with captions "a <colour> square, flat colour, demo, <i>"."""
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (size, size), COLOURS[i % 6]).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {NAMES[i % 6]} square, flat colour, demo, {i}")
    return folder


def write_config(tmp_path, name: str, count: int = 4, steps: int = 40, extra: str = "", arch: str = "sdxl") -> str:
    """A config for the tiny `arch` model on `tmp_path/data` (made once), writing to `tmp_path/name`:
    DoRA rank 4 on attention, AdamW8bit, caption shuffling and dropout, flips, fp32, a state every 5 steps."""
    data = tmp_path / "data"
    if not data.exists():
        make_dataset(data, count)
    text = f"""
[model]
path = "builtin:tiny-{arch}"
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


class StopAt(TrainerCallback):
    """Stops the run cleanly after optimizer step `step`, as Ctrl+C would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, loss):
        if step == self.step:
            trainer.request_stop("the test")


class SeenBatches(TrainerCallback):
    """Records (epoch, [record index, ...]) of every micro-batch trained."""

    def __init__(self):
        self.seen = []

    def on_batch(self, trainer, epoch, keys):
        self.seen.append((epoch, [key.record for key in keys]))


def run(config, overrides=(), resume=None, stop_at=None, callbacks=()):
    """Train `config` with `overrides`; with `stop_at`, stop cleanly after that step (the trainer saves a state)."""
    cfg = load_config(config, list(overrides))
    callbacks = list(callbacks) + ([StopAt(stop_at)] if stop_at is not None else [])
    trainer = Trainer(cfg, resume=resume, quiet=True, callbacks=callbacks)
    if stop_at is None:
        trainer.run()
        return trainer
    with pytest.raises(TrainingInterrupted, match=f"after step {stop_at} "):
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

"""log.tensorboard = "auto" (the default): on when tensorboard is installed, else off with one note."""

from __future__ import annotations

import importlib.util

import pytest

from helpers_training import write_config
from sdtrain.config import load_config
from sdtrain.errors import ConfigError
from sdtrain.train.loop import Trainer


@pytest.fixture
def without_tensorboard(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "tensorboard" else real(name, *a, **k))


def test_auto_without_tensorboard_is_off_with_one_note(tmp_path, without_tensorboard):
    config = write_config(tmp_path, "run", steps=1)
    notes = []
    cfg = load_config(config, ["log.tensorboard=auto"], notes=notes)
    assert cfg.log.tensorboard is False
    assert len(notes) == 1 and notes[0].startswith("TensorBoard logging is off: the tensorboard package is not "
                                                   "installed (pip install tensorboard turns it on")
    with pytest.raises(ConfigError, match="'log.tensorboard' in --set log.tensorboard=true: needs the tensorboard"):
        load_config(config, ["log.tensorboard=true"])
    assert load_config(config, ["log.tensorboard=false"]).log.tensorboard is False
    with pytest.raises(ConfigError, match='accepts true, false or "auto"; did you mean "auto"'):
        load_config(config, ["log.tensorboard=Auto"])


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_auto_with_tensorboard_writes_event_files(tmp_path):
    config = write_config(tmp_path, "run", steps=2)
    notes = []
    cfg = load_config(config, ["log.tensorboard=auto", "log.log_every_n_steps=1", "save.state_every_n_steps=0"],
                      notes=notes)
    assert cfg.log.tensorboard is True and notes == []
    Trainer(cfg, quiet=True).run()
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))

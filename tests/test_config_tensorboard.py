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


def test_trackers_resolve_and_a_missing_package_is_a_config_error(tmp_path, monkeypatch):
    """log.trackers: "tensorboard" joins when log.tensorboard is on; a tracker whose package is missing (wandb
    here, hidden if installed) fails at config time naming the package; the CLI exits with code 2."""
    import subprocess
    import sys

    config = write_config(tmp_path, "run", steps=1)
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    assert load_config(config, ["log.tensorboard=auto"]).log.trackers == (["tensorboard"] if tensorboard else [])
    assert load_config(config, ["log.tensorboard=false"]).log.trackers == []
    with pytest.raises(ConfigError, match='log.trackers.*has "tensorboard" but log.tensorboard = false'):
        load_config(config, ["log.tensorboard=false", 'log.trackers=["tensorboard"]'])
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(config, ['log.trackers=["wandbb"]'])
    wandb = importlib.util.find_spec("wandb") is not None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "wandb" else real(name, *a, **k))
    with pytest.raises(ConfigError, match=r'"wandb" needs the wandb package; install it \(pip install wandb\)'):
        load_config(config, ["log.tensorboard=false", 'log.trackers=["wandb"]'])
    if not wandb:
        done = subprocess.run([sys.executable, "-m", "sdtrain", "train", config, "--dry-run", "--set",
                               'log.trackers=["wandb"]'], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "pip install wandb" in done.stderr


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_run_gets_scalars_config_and_sample_grids(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = write_config(tmp_path, "run", steps=2)
    cfg = load_config(config, ['log.trackers=["wandb"]', "log.tensorboard=false", "log.log_every_n_steps=1",
                               "save.state_every_n_steps=0", "sample.every_n_steps=2",
                               'sample.prompts=["a red square --w 64 --h 64 --s 1"]'])
    Trainer(cfg, quiet=True).run()
    runs = list((tmp_path / "run" / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    data = b"".join(p.read_bytes() for p in runs[0].glob("run-*.wandb"))
    for expected in (b"loss", b"samples", b"network.rank"):
        assert expected in data

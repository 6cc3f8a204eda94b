"""`sdtrain doctor` checks the optional packages the example configs use, and says the truth about them."""

from __future__ import annotations

import importlib.util

import pytest

from sdtrain.cli import main
from sdtrain.commands import doctor


@pytest.fixture
def hide(monkeypatch):
    """Make packages look not installed (find_spec answers None for them)."""
    real = importlib.util.find_spec

    def apply(*names):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, **k: None if name in names else real(name, *a, **k))

    return apply


def test_needs_of_the_shipped_configs():
    configs = doctor.shipped_configs()
    assert set(configs) == {"character.toml", "demo.toml", "sd15.toml", "style.toml"}
    needs = doctor.optional_needs(configs)
    assert needs["bitsandbytes"] == dict.fromkeys(configs, "required")  # all use AdamW8bit
    assert needs["tensorboard"] == dict.fromkeys(configs, "auto")
    assert needs["matplotlib"] == {}  # used by `sdtrain analyze`, not by a config


def test_doctor_passes_and_names_the_users(capsys):
    assert main(["doctor", "--skip-model"]) == 0
    out = capsys.readouterr().out
    assert "  ok    bitsandbytes: " in out and "used by character.toml, demo.toml, sd15.toml, style.toml" in out
    assert "  ok    8-bit optimizer: AdamW8bit step with 8-bit state" in out
    assert out.rstrip().endswith("all checks passed")


def test_missing_tensorboard_is_a_warning_that_says_how_to_turn_it_on(hide, capsys):
    hide("tensorboard")
    assert main(["doctor", "--skip-model"]) == 0
    out = capsys.readouterr().out
    assert ("  warn  tensorboard: tensorboard is not installed: TensorBoard logging (log.tensorboard) is off in "
            "character.toml, demo.toml, sd15.toml, style.toml; pip install tensorboard turns it on") in out
    assert out.rstrip().endswith("all checks passed (1 warning)")


def test_a_package_a_config_needs_fails(hide, capsys, monkeypatch, tmp_path):
    (tmp_path / "logged.toml").write_text("[log]\ntensorboard = true\n[optimizer]\ntype = \"AdamW\"\n")
    (tmp_path / "prodigy.toml").write_text("[optimizer]\ntype = \"Prodigy\"\n")
    real = doctor.shipped_configs
    monkeypatch.setattr(doctor, "shipped_configs", lambda: real(tmp_path))
    hide("tensorboard", "prodigyopt")
    assert main(["doctor", "--skip-model"]) == 1
    out = capsys.readouterr().out
    assert ("  FAIL  tensorboard: tensorboard is not installed and logged.toml needs it for TensorBoard logging "
            "(log.tensorboard); pip install tensorboard") in out
    assert "  FAIL  prodigyopt: prodigyopt is not installed and prodigy.toml needs it" in out
    assert "bitsandbytes" not in out.split("8-bit optimizer")[0]  # neither config uses an 8-bit optimizer
    assert out.rstrip().endswith("some checks failed")

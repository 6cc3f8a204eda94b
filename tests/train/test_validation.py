"""Validation loss: the held-out split, fixed timesteps and noise, and the same curve across a resume."""

from __future__ import annotations

import pytest
import torch

from helpers_training import make_dataset, run, write_config
from sdtrain.config import load_config
from sdtrain.data.buckets import Bucketing
from sdtrain.data.dataset import SubsetSpec, scan_dataset
from sdtrain.errors import ConfigError
from sdtrain.train.plan import describe_plan, make_plan
from sdtrain.train.validation import hold_out, validation_timesteps


def test_timesteps_are_the_centres_of_equal_parts():
    assert validation_timesteps(4, 0, 1000) == [125, 375, 625, 875]
    assert validation_timesteps(2, 100, 300) == [150, 250]
    assert validation_timesteps(1, 0, 1000) == [500]


def test_hold_out_is_seeded_and_never_takes_everything(tmp_path):
    dataset = scan_dataset([SubsetSpec(make_dataset(tmp_path / "d", count=6))], Bucketing(64))
    kept, held = hold_out(dataset, 0.34, seed=1)
    assert len(held) == 2 and len(kept.records) == 4
    assert {r.path for r in held}.isdisjoint(r.path for r in kept.records)
    assert [r.path for r in hold_out(dataset, 0.34, seed=1)[1]] == [r.path for r in held]
    assert any([r.path for r in hold_out(dataset, 0.34, seed=s)[1]] != [r.path for r in held] for s in range(2, 6))
    assert len(hold_out(dataset, 0.01, seed=1)[1]) == 1  # at least one
    single = scan_dataset([SubsetSpec(make_dataset(tmp_path / "one", count=1))], Bucketing(64))
    with pytest.raises(ConfigError, match="validation.fraction = 0.5 would hold out all 1"):
        hold_out(single, 0.5, seed=1)


def test_plan_shows_the_split_and_a_validation_folder(tmp_path):
    config = write_config(tmp_path, "plan", count=4)
    cfg = load_config(config, ["validation.fraction=0.25", "validation.every_n_steps=7"])
    plan = make_plan(cfg)
    assert len(plan.dataset.records) == 3 and len(plan.validation) == 1
    text = describe_plan(plan, cfg)
    assert "validation: 1 image (held out 0.25 of the training images, seed 3) x 4 fixed timesteps, every 7" in text
    folder = make_dataset(tmp_path / "held", count=2)
    cfg = load_config(config, [f"validation.path={folder}"])
    plan = make_plan(cfg)
    assert len(plan.dataset.records) == 4 and [r.path.parent for r in plan.validation] == [folder, folder]
    with pytest.raises(Exception, match="not both"):
        load_config(config, [f"validation.path={folder}", "validation.fraction=0.25"])


def test_validation_loss_is_identical_across_a_resume(tmp_path):
    """A run stopped at step 3 and resumed logs the validation losses of a straight run, bit for bit; evaluating
    again at the same weights gives the same value (fixed noise and timesteps)."""
    options = ["validation.fraction=0.25", "validation.every_n_steps=2", "save.state_every_n_steps=0"]
    straight = run(write_config(tmp_path, "straight", steps=4), options)
    assert [step for step, _ in straight.result.validation] == [2, 4]
    assert straight.validator.evaluate(straight) == straight.result.validation[-1][1]
    config = write_config(tmp_path, "resumed", steps=4)
    run(config, options, stop_at=3)
    resumed = run(config, options, resume="latest")
    assert resumed.result.validation == straight.result.validation[1:]
    log = (tmp_path / "resumed" / "validation_log.csv").read_text()
    assert log == (tmp_path / "straight" / "validation_log.csv").read_text()
    assert straight.result.validation[0][1] != straight.result.validation[1][1]  # the weights moved it
    torch.testing.assert_close(torch.tensor(straight.result.losses[-1]), torch.tensor(resumed.result.losses[-1]),
                               rtol=0, atol=0)

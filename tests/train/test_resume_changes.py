"""Resume with changed settings: the learning-rate schedule is re-planned from the new totals exactly as a
straight run with those settings; every change that affects training is refused or noted as re-planned by
name; changed captions are a changed dataset."""

from __future__ import annotations

import pytest

from helpers_training import loss_log, run, write_config
from sdtrain.cli import main
from sdtrain.config import load_config
from sdtrain.train.plan import make_plan
from sdtrain.train.state import check_resumable, complete_states, read_state_info, states_root


def learning_rates(trainer) -> list[str]:
    return [line.split(",")[2] for line in loss_log(trainer).splitlines()[1:]]


def test_cosine_schedule_is_recomputed_for_a_longer_run(tmp_path, capsys):
    """4 steps of cosine with warm-up, then resumed to 7: steps 5-7 get exactly the rates of a straight
    7-step run (not the 4-step schedule's), and the change is noted as a re-plan."""
    schedule = ["scheduler.type=cosine", "scheduler.warmup_steps=2", "save.state_every_n_steps=0"]
    config = write_config(tmp_path, "resumed", steps=4)
    first = run(config, schedule)
    capsys.readouterr()
    assert main(["train", config, *[a for o in schedule + ["train.max_steps=7"] for a in ("--set", o)],
                 "--resume", "latest"]) == 0
    err = capsys.readouterr().err
    assert "note: train.max_steps changed from 4 to 7; re-planned: the learning-rate schedule is recomputed for " \
           "7 steps" in err
    straight = run(write_config(tmp_path, "straight", steps=7), schedule)
    resumed_rates = learning_rates(first)  # the same output folder: the resumed run continued its log
    assert len(resumed_rates) == 7
    assert resumed_rates[4:] == learning_rates(straight)[4:]
    assert resumed_rates[:4] != learning_rates(straight)[:4]  # the first 4 steps had the shorter schedule


CHANGES = {  # the list: each is re-planned and named, or refused and named
    "data.subsets.0.flip": "false",
    "data.subsets.0.caption_dropout": "0.5",
    "train.loss": '"huber"',
    "train.min_snr_gamma": "5.0",
    "train.noise_offset": "0.05",
    "train.min_timestep": "100",
    "train.max_timestep": "900",
    "optimizer.betas": "[0.8, 0.95]",
    "scheduler.type": '"linear"',
}


@pytest.fixture(scope="module")
def one_step_state(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("state")
    config = write_config(tmp_path, "run", steps=1)
    trainer = run(config)
    return config, read_state_info(complete_states(states_root(trainer.output_dir))[0][-1])


@pytest.mark.parametrize("key", CHANGES)
def test_every_training_change_is_named_on_resume(one_step_state, key):
    config, info = one_step_state
    cfg = load_config(config, [f"{key}={CHANGES[key]}", "train.max_steps=3"])
    notes = check_resumable(info, cfg, make_plan(cfg))
    named = [note for note in notes if note.startswith(f"{key} changed from ")]
    assert len(named) == 1 and "re-planned" in named[0], notes


def test_changed_dataset_path_or_captions(tmp_path, capsys, monkeypatch):
    """A dataset moved elsewhere with the same images and captions resumes (the path change is named); a
    changed caption is a changed dataset: exit 2 before any weights load, naming captions."""
    import shutil

    import sdtrain.models.loading as loading

    config = write_config(tmp_path, "run", steps=1)
    run(config)
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "data", moved)
    cfg = load_config(config, [f"data.subsets.0.path={moved}", "train.max_steps=2"])
    info = read_state_info(complete_states(states_root(tmp_path / "run"))[0][-1])
    notes = check_resumable(info, cfg, make_plan(cfg))
    assert [note for note in notes if note.startswith("data.subsets.0.path changed from")]

    (tmp_path / "data" / "img1.txt").write_text("a blue square, flat colour, demo, renamed")

    def no_weights(*args, **kwargs):
        raise AssertionError("model weights loaded")

    monkeypatch.setattr(loading, "load_base", no_weights)
    capsys.readouterr()
    assert main(["train", config, "--set", "train.max_steps=2", "--resume", "latest", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the dataset changed (images, captions, repeats or buckets" in err

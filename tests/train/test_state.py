"""Resume that really resumes: interrupted + resumed runs equal uninterrupted ones, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from safetensors.torch import load_file

from helpers_training import adapter_tensors, assert_bitwise_equal, loss_log, run, write_config
from sdtrain.train.state import ResumeError, complete_states, states_root


@pytest.mark.parametrize("stop_at,accumulation", [
    (20, 1),  # 4 batches per epoch: 40 steps straight vs 20, stop at an epoch boundary, resume, 20
    (22, 1),  # a stop in the middle of an epoch
    (11, 2),  # accumulation 2: 20 steps of 2 batches, a stop after 22 batches (mid-epoch)
], ids=["epoch-boundary", "mid-epoch", "grad-accum-2"])
def test_interrupt_and_resume_is_bitwise_identical(tmp_path, monkeypatch, stop_at, accumulation):
    overrides = [f"train.gradient_accumulation_steps={accumulation}", f"train.max_steps={40 // accumulation}"]
    straight = run(write_config(tmp_path, "straight"), overrides)
    config = write_config(tmp_path, "resumed")
    first = run(config, overrides, stop_at=stop_at, monkeypatch=monkeypatch)
    assert first.global_step == stop_at
    second = run(config, overrides, resume="latest")

    assert_bitwise_equal(adapter_tensors(straight), adapter_tensors(second))
    assert first.result.losses + second.result.losses == straight.result.losses
    assert loss_log(second) == loss_log(straight)
    files_straight = load_file(str(straight.result.final_adapter))
    files_resumed = load_file(str(second.result.final_adapter))
    assert_bitwise_equal(files_straight, files_resumed)

    # within the interrupted epoch every image is seen exactly as often as in an uninterrupted epoch
    epoch = first.result.seen[-1][0]
    counts = Counter()
    for seen_epoch, records in first.result.seen + second.result.seen:
        if seen_epoch == epoch:
            counts.update(records)
    expected = Counter()
    for seen_epoch, records in straight.result.seen:
        if seen_epoch == epoch:
            expected.update(records)
    assert counts == expected and set(counts.values()) == {1}


def test_incompatible_change_is_refused_and_compatible_one_warns(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, "run", steps=10)
    run(config, ["train.max_steps=10"])
    with pytest.raises(ResumeError, match="network.rank was 4, now 8"):
        run(config, ["train.max_steps=20", "network.rank=8"], resume="latest")
    with pytest.warns(UserWarning, match="optimizer.lr changed"):
        trainer = run(config, ["train.max_steps=12", "optimizer.lr=1e-3"], resume="latest")
    assert trainer.global_step == 12
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_resume_latest_without_state_names_the_fix(tmp_path):
    config = write_config(tmp_path, "none", steps=2)
    with pytest.raises(ResumeError, match="state_every_n_steps"):
        run(config, resume="latest")


def test_sigkill_during_state_save_leaves_previous_state(tmp_path):
    """A run killed with SIGKILL while writing its step-10 state resumes from step 5 and ends where an
    uninterrupted run ends."""
    steps = 14
    straight = run(write_config(tmp_path, "straight", steps=steps))
    config = write_config(tmp_path, "killed", steps=steps)
    marker = tmp_path / "hanging"
    env = dict(os.environ, SDTRAIN_TEST_HANG_IN_STATE_SAVE="10", SDTRAIN_TEST_HANG_MARKER=str(marker),
               HF_HUB_OFFLINE="1")
    process = subprocess.Popen([sys.executable, "-m", "sdtrain", "train", config, "--quiet"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not marker.exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the run never reached the state save"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    root = states_root(tmp_path / "killed")
    assert any(p.name.startswith(".incomplete-") for p in root.iterdir())
    with pytest.warns(UserWarning, match="incomplete training state"):
        states = complete_states(root)
    assert [p.name for p in states] == ["step-00000005"]

    with pytest.warns(UserWarning, match="incomplete"):
        resumed = run(config, resume="latest")
    assert_bitwise_equal(adapter_tensors(straight), adapter_tensors(resumed))
    assert loss_log(resumed) == loss_log(straight)

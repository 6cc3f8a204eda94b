"""Resume that really resumes: stopped (in process, by SIGINT/SIGTERM, by SIGKILL during a save) and resumed runs
equal uninterrupted ones, bit for bit; a resume that cannot work fails before any weights load."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from safetensors.torch import load_file

from helpers_training import (SeenBatches, adapter_tensors, assert_bitwise_equal, loss_log, make_dataset, run,
                              write_config)
from sdtrain.cli import main
from sdtrain.train.state import ADAPTERS, complete_states, states_root


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 40-step run of the helper config, and the batches it trained."""
    seen = SeenBatches()
    return run(write_config(tmp_path_factory.mktemp("straight"), "straight"), callbacks=[seen]), seen.seen


def check_epoch_coverage(seen_first, seen_second, seen_straight, epoch):
    """Within the interrupted epoch every image is seen exactly as often as in an uninterrupted epoch."""
    def count(seen):
        counts = Counter()
        for seen_epoch, records in seen:
            if seen_epoch == epoch:
                counts.update(records)
        return counts

    assert count(seen_first + seen_second) == count(seen_straight)
    assert set(count(seen_straight).values()) == {1}


@pytest.mark.parametrize("stop_at", [20, 22], ids=["epoch-boundary", "mid-epoch"])
def test_stop_and_resume_is_bitwise_identical(tmp_path, straight, stop_at):
    """4 batches per epoch: 40 steps straight vs stop at `stop_at` (a clean stop saves a state), resume."""
    straight, seen_straight = straight
    config = write_config(tmp_path, "resumed")
    seen_first, seen_second = SeenBatches(), SeenBatches()
    first = run(config, stop_at=stop_at, callbacks=[seen_first])
    assert first.global_step == stop_at
    second = run(config, resume="latest", callbacks=[seen_second])

    assert_bitwise_equal(adapter_tensors(straight), adapter_tensors(second))
    assert first.result.losses + second.result.losses == straight.result.losses
    assert loss_log(second) == loss_log(straight)
    assert_bitwise_equal(load_file(str(straight.result.final_adapter)), load_file(str(second.result.final_adapter)))
    check_epoch_coverage(seen_first.seen, seen_second.seen, seen_straight, seen_first.seen[-1][0])


def stop_and_resume_matches_straight(tmp_path, overrides, stop_at: int, extra: str = ""):
    """A run stopped after step `stop_at` and resumed ends bit-identical to a straight run (adapter and
    loss_log.csv); returns the straight run."""
    straight = run(write_config(tmp_path, "straight", extra=extra), overrides)
    config = write_config(tmp_path, "resumed", extra=extra)
    run(config, overrides, stop_at=stop_at)
    second = run(config, overrides, resume="latest")
    assert_bitwise_equal(adapter_tensors(straight), adapter_tensors(second))
    assert loss_log(second) == loss_log(straight)
    return straight


def test_accumulation_stop_mid_epoch_and_resume(tmp_path):
    """Accumulation 2: 20 steps of 2 batches straight vs a stop after 22 batches (mid-epoch) and resume; the
    cosine schedule with warm-up resumes at its position."""
    overrides = ["train.gradient_accumulation_steps=2", "train.max_steps=20", "scheduler.type=cosine",
                 "scheduler.warmup_steps=4"]
    stop_and_resume_matches_straight(tmp_path, overrides, stop_at=11)


def test_adapter_dropout_and_blocks_stop_and_resume(tmp_path):
    """Network / rank / module dropout (their masks recomputed under gradient checkpointing) and a block with its
    own rank and learning rate: a run stopped after step 3 and resumed ends bit-identical to the straight run,
    which the dropout changed."""
    overrides = ["train.max_steps=6", "network.dropout=0.2", "network.rank_dropout=0.3", "network.module_dropout=0.2",
                 "train.gradient_checkpointing=true", "network.blocks.0.pattern=lora_unet_output_blocks_*",
                 "network.blocks.0.rank=2", "network.blocks.0.lr=5e-3"]
    straight = stop_and_resume_matches_straight(tmp_path, overrides, stop_at=3)
    plain = run(write_config(tmp_path, "plain"), overrides[:1] + overrides[4:])
    assert plain.result.losses[1:] != straight.result.losses[1:]


def default_config(tmp_path, steps: int) -> str:
    """Only what a run needs; everything else at its default (no save.* keys: states are written anyway)."""
    data = tmp_path / "data"
    if not data.exists():
        make_dataset(data, 4)
    path = tmp_path / "default.toml"
    path.write_text(f'[model]\npath = "builtin:tiny-sdxl"\n[data]\nresolution = 64\nmin_bucket_side = 64\n'
                    f'[[data.subsets]]\npath = "{data}"\n[train]\nmax_steps = {steps}\n')
    return str(path)


def test_finished_default_run_resumes_to_more_steps(tmp_path, capsys):
    """A finished run with the default config leaves a state; resuming it with a higher max_steps equals one
    straight run to that step count, bit for bit."""
    config = default_config(tmp_path, steps=4)
    first = run(config)
    states = complete_states(states_root(first.output_dir))[0]
    assert [p.name for p in states] == ["step-00000004"]  # save.keep_last_states = 1: the newest only
    state_bytes = sum(p.stat().st_size for p in states[0].iterdir())
    assert state_bytes < 4 * (states[0] / ADAPTERS).stat().st_size + 100_000  # adapter + optimizer, no model

    capsys.readouterr()
    assert main(["train", config, "--set", "train.max_steps=4", "--resume", "latest"]) == 0
    assert "note: nothing to train" in capsys.readouterr().err
    longer = run(config, ["train.max_steps=7"], resume="latest")
    assert longer.result.steps == 7 and len(longer.result.losses) == 3
    assert [p.name for p in complete_states(states_root(first.output_dir))[0]] == ["step-00000007"]
    straight = run(config, ["train.max_steps=7", f"train.output_dir={tmp_path / 'straight'}"])
    assert_bitwise_equal(adapter_tensors(straight), adapter_tensors(longer))
    assert loss_log(longer) == loss_log(straight)


def test_resume_that_cannot_work_exits_2_before_weights_load(tmp_path, monkeypatch, capsys, recwarn):
    import sdtrain.models.loading as loading

    config = write_config(tmp_path, "run", steps=5)
    real_load = loading.load_base

    def no_weights(*args, **kwargs):
        raise AssertionError("model weights loaded")

    monkeypatch.setattr(loading, "load_base", no_weights)
    assert main(["train", config, "--resume", "latest", "--quiet"]) == 2
    assert "no complete training state" in capsys.readouterr().err

    monkeypatch.setattr(loading, "load_base", real_load)
    run(config)
    monkeypatch.setattr(loading, "load_base", no_weights)
    assert main(["train", config, "--set", "network.rank=8", "--set", "train.max_steps=8", "--resume", "latest"]) == 2
    assert "network.rank was 4, now 8" in capsys.readouterr().err

    # a compatible change is noted once, in sdtrain's words, and applies
    monkeypatch.setattr(loading, "load_base", real_load)
    assert main(["train", config, "--set", "train.max_steps=7", "--set", "optimizer.lr=1e-3",
                 "--resume", "latest"]) == 0
    err = capsys.readouterr().err
    assert err.count("note: optimizer.lr changed from 0.002 to 0.001") == 1
    assert not [w for w in recwarn if "sdtrain" in str(w.filename)]
    trainer = run(config, ["train.max_steps=8", "optimizer.lr=1e-3"], resume="latest")
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


# ---------------------------------------------------------------- signals, in a real process


def sdtrain_process(args, script=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "sdtrain", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(process, done, what: str, timeout: float = 600):
    deadline = time.time() + timeout
    while not done():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.stderr.read()[-3000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def logged_steps(folder) -> int:
    path = folder / "loss_log.csv"
    return len(path.read_text().splitlines()) - 1 if path.is_file() else 0


# A resumed run that hangs in its first state save until it is killed (the test's own fault injection).
HANG_IN_STATE_SAVE = """
import pathlib, sys, time
import sdtrain.train.state as state

def hang(folder):
    pathlib.Path(sys.argv[1]).touch()
    while True:
        time.sleep(1)

state.fsync_tree = hang
from sdtrain.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigint_sigterm_sigkill_then_resume_is_bitwise_identical(tmp_path, straight):
    """Ctrl+C, then SIGTERM, then SIGKILL while a state is being written: each stop leaves a loadable state,
    the printed command continues the run, and the end equals an uninterrupted run."""
    straight, _ = straight
    config = write_config(tmp_path, "stopped")
    out = tmp_path / "stopped"

    process = sdtrain_process(["train", config, "--quiet"])
    wait_for(process, lambda: logged_steps(out) >= 3, "step 3")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 130, err
    first = int(re.search(r"stopped by SIGINT after step (\d+) of 40", err).group(1))
    assert (states_root(out) / f"step-{first:08d}" / ADAPTERS).is_file()
    command = err.split("Continue with:\n")[1].strip().splitlines()[0]
    assert command == shlex.join(["sdtrain", "train", config, "--quiet", "--resume", "latest"])

    process = sdtrain_process(shlex.split(command)[1:])
    wait_for(process, lambda: logged_steps(out) >= first + 3, f"step {first + 3}")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 143, err
    second = int(re.search(r"stopped by SIGTERM after step (\d+) of 40", err).group(1))
    assert second > first and complete_states(states_root(out))[0][-1].name == f"step-{second:08d}"

    marker = tmp_path / "hanging"
    process = sdtrain_process([str(marker), "train", config, "--quiet", "--resume", "latest"], HANG_IN_STATE_SAVE)
    wait_for(process, marker.exists, "the next state save")
    process.send_signal(signal.SIGKILL)
    process.wait()
    states, incomplete = complete_states(states_root(out))
    assert incomplete and states[-1].name == f"step-{second:08d}"  # the state being written does not count

    resumed = run(config, resume="latest")
    assert_bitwise_equal(adapter_tensors(straight), adapter_tensors(resumed))
    assert loss_log(resumed) == loss_log(straight)


def test_noise_timestep_and_caption_options_stop_and_resume_bitwise(tmp_path):
    """Multires and input-perturbation noise, logit-normal shifted timesteps on the zero-terminal-SNR schedule,
    loss weights, 150-token captions and wildcard captions drawn per use: a run stopped at step 3 and resumed
    ends bit-identical to a straight one."""
    from PIL import Image

    wild = tmp_path / "wild"
    wild.mkdir()
    Image.new("RGB", (64, 64), (120, 60, 200)).save(wild / "w.png")
    (wild / "w.txt").write_text("a {purple|violet} square\nsome {flat|plain} colour, " + ", ".join(["demo"] * 40))
    extra = f'[[data.subsets]]\npath = "{wild}"\nwildcards = true\ncaption_prefix = "sks,"\ncaption_suffix = ", end"\n'
    overrides = ["train.max_steps=6", "model.prediction_type=v_prediction", "train.zero_terminal_snr=true",
                 "train.multires_noise_iterations=3", "train.ip_noise_gamma=0.1", "train.timestep_sampling=logit_normal",
                 "train.timestep_shift=2", "train.debiased_estimation_loss=true",
                 "train.scale_v_pred_loss_like_noise_pred=true", "model.max_token_length=150"]
    stop_and_resume_matches_straight(tmp_path, overrides, stop_at=3, extra=extra)

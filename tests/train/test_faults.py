"""Faults of the machine become exit-2 messages naming the path and the fix: too little space or a file-size
limit found before the model loads, a disk that fills during the run, output under /proc."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from helpers_training import run, write_config
from sdtrain.cli import main
from sdtrain.config import load_config
from sdtrain.files import write_fault
from sdtrain.train.loop import TrainerCallback
from sdtrain.train.plan import make_plan
from sdtrain.train.space import output_size
from sdtrain.train.state import ADAPTERS, complete_states, states_root


def no_weights(*args, **kwargs):
    raise AssertionError("model weights loaded")


def test_space_estimate_covers_what_a_run_writes_and_too_little_exits_2_early(tmp_path, monkeypatch, capsys):
    import sdtrain.models.loading as loading
    import sdtrain.train.space as space

    config = write_config(tmp_path, "run", steps=6)
    cfg = load_config(config, ["save.every_n_steps=2"])
    estimate = output_size(cfg, make_plan(cfg))
    trainer = run(config, ["save.every_n_steps=2"])
    written = sum(p.stat().st_size for p in trainer.output_dir.glob("run*.safetensors"))
    written += sum(p.stat().st_size for p in states_root(trainer.output_dir).rglob("*") if p.is_file())
    assert written <= estimate.total <= 20 * written + 10 * (1 << 20)

    monkeypatch.setattr(loading, "load_base", no_weights)
    monkeypatch.setattr(space, "free_bytes", lambda path: 50_000)
    fresh = tmp_path / "fresh"
    assert main(["train", config, "--set", f"train.output_dir={fresh}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"train.output_dir {fresh}: the run needs about" in err and "48.8 KiB free" in err
    assert "save.keep_last_states" in err and "Traceback" not in err


def test_file_size_limit_exits_2_before_the_model_loads(tmp_path):
    """`ulimit -f` below the adapter's size, in a real process: exit 2, the limit named, no step trained."""
    config = write_config(tmp_path, "run", steps=2)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    done = subprocess.run([sys.executable, "-m", "sdtrain", "train", config, "--quiet"], preexec_fn=limit,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    assert "at most 64.0 KiB (ulimit -f)" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "loss_log.csv").exists()


def test_disk_full_error_names_the_file_and_space():
    """The message of a real ENOSPC (writing to /dev/full)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(OSError) as error:
        with open("/dev/full", "wb") as handle:
            handle.write(b"x" * 100)
    assert error.value.errno == errno.ENOSPC
    fault = write_fault(error.value, Path("/tmp/somewhere/run.safetensors"), needed=2048)
    assert "cannot write /tmp/somewhere/run.safetensors: no space left on the device" in str(fault)
    assert "it needs about 2.0 KiB" in str(fault) and "Free some space" in str(fault)


def test_output_under_proc_exits_2(tmp_path, capsys):
    config = write_config(tmp_path, "run", steps=2)
    assert main(["train", config, "--set", "train.output_dir=/proc/sdtrain-output", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "train.output_dir" in err and "/proc" in err and "Traceback" not in err


class FillDiskAt(TrainerCallback):
    """Fills the output folder's filesystem after step `step`, leaving `left` bytes (small appends still fit)."""

    def __init__(self, step: int, left: int):
        self.step, self.left = step, left

    def on_step_end(self, trainer, step, loss):
        if step == self.step:
            free = os.statvfs(trainer.output_dir)
            room = free.f_bavail * free.f_frsize - self.left
            with open(trainer.output_dir.parent / "filler", "wb") as handle:
                handle.write(b"\0" * room)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (needs the right to mount: skipped elsewhere)."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_that_fills_during_the_run(tmp_path, small_disk):
    """A real full disk at the end of the run, where the final state is saved (before the final adapter):
    WriteError (exit 2) naming the file and the free space; the state written before is intact, no final adapter
    and no temporary file is left."""
    from sdtrain.files import WriteError

    config = write_config(tmp_path, "run", steps=7)
    out = small_disk / "out"
    with pytest.raises(WriteError) as error:
        run(config, [f"train.output_dir={out}"], callbacks=[FillDiskAt(6, left=64 * 1024)])
    message = str(error.value)
    assert error.value.exit_code == 2
    assert f"cannot write {out / 'states' / '.incomplete-step-00000007'}/" in message
    assert "no space left on the device" in message and "the previous training states are kept" in message
    assert "free in" in message and "Free some space there or write to another disk" in message
    assert not (out / "run.safetensors").exists()
    state = complete_states(states_root(out))[0][-1]
    assert state.name == "step-00000005"
    assert all(torch.isfinite(t).all() for t in __import__("safetensors.torch").torch.load_file(
        str(state / ADAPTERS)).values())
    assert not [p for p in out.rglob("*.tmp")]

"""Training states that cannot run code, survive a kill while one replaces another, and belong to one run at a
time: the pickle-free state files, the refusal of a planted pickle, the kill in the replacement window, the
output folder's lock and the cleanup of killed writes."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers_training import run, write_config
from sdtrain.cli import main
from sdtrain.train.state import ADAPTERS, complete_states, states_root
from sdtrain.train.state_codec import load_tree, looks_like_pickle, rng_state, save_tree, set_rng_state


class Payload:
    """Unpickling this creates the folder `marker`: the proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_optimizer_state_round_trips_exactly_through_safetensors_and_json(tmp_path):
    """bitsandbytes' AdamW8bit state (uint8 moments, quantisation maps, absmax, int keys, tuples, None) and the
    RNG states come back exactly: two optimizers continue bit for bit."""
    from sdtrain.train.optim import build_optimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(8))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]

    def optimizer(ps):
        return build_optimizer([{"params": ps, "lr": 1e-2}], "AdamW8bit", 1e-2, 0.01, (0.9, 0.99), 1e-8, {})

    first = optimizer(params)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        first.step()
    save_tree(tmp_path, "optimizer", first.state_dict())
    assert not any(looks_like_pickle(path) for path in tmp_path.iterdir())
    second = optimizer(copies)
    with torch.no_grad():
        for p, q in zip(params, copies):
            q.copy_(p)
    second.load_state_dict(load_tree(tmp_path, "optimizer"))
    for _ in range(2):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, copies, grads):
            p.grad, q.grad = g.clone(), g.clone()
        first.step()
        second.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)

    save_tree(tmp_path, "rng", rng_state())
    expected = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    set_rng_state(load_tree(tmp_path, "rng"))
    again = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_pickle_planted_in_a_copied_state_does_not_run(tmp_path, capsys, monkeypatch):
    """A state copied elsewhere with pickles added under accelerate's names, or a pickle in place of a state
    file: resume exits 2 naming the file, and the payload never runs (its marker folder stays absent)."""
    import sdtrain.models.loading as loading

    def no_weights(*args, **kwargs):
        raise AssertionError("model weights loaded")

    config = write_config(tmp_path, "run", steps=2)
    trainer = run(config)
    state = complete_states(states_root(trainer.output_dir))[0][-1]
    assert not any(looks_like_pickle(path) for path in state.iterdir())
    marker = tmp_path / "payload-ran"
    real_load = loading.load_base
    monkeypatch.setattr(loading, "load_base", no_weights)  # a planted pickle is refused before any weights load

    for planted in ("random_states_0.pkl", "custom_checkpoint_0.pkl", "optimizer.bin", "scaler.pt"):
        copied = tmp_path / f"copied-{planted}"
        shutil.copytree(state, copied)
        (copied / planted).write_bytes(pickle.dumps(Payload(marker)))
        capsys.readouterr()
        assert main(["train", config, "--set", "train.max_steps=3", "--resume", str(copied), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"it holds {planted}" in err and "never writes" in err and "Traceback" not in err
        assert not marker.exists()

    # a pickle in place of the optimizer's own files: read as safetensors/JSON, refused as damaged
    monkeypatch.setattr(loading, "load_base", real_load)
    for replaced in ("optimizer.safetensors", "optimizer.json"):
        copied = tmp_path / f"replaced-{replaced}"
        shutil.copytree(state, copied)
        (copied / replaced).write_bytes(pickle.dumps(Payload(marker)))
        assert main(["train", config, "--set", "train.max_steps=3", "--resume", str(copied), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "damaged" in err and "Traceback" not in err
        assert not marker.exists()

    # torch.load/pickle are never called while a state loads
    def no_unpickling(*args, **kwargs):
        raise AssertionError("a state was unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    assert main(["train", config, "--set", "train.max_steps=3", "--resume", "latest", "--quiet"]) == 0


# A run that stops in its final state save right after the old state of that step was renamed aside (the
# replacement window), writes the marker and waits to be killed: the test's own fault injection.
HANG_IN_REPLACEMENT = """
import pathlib, sys, time
import sdtrain.train.state as state

set_aside = state._set_aside

def hang(final, replaced):
    set_aside(final, replaced)
    pathlib.Path(sys.argv[1]).touch()
    while True:
        time.sleep(1)

state._set_aside = hang
from sdtrain.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill_in_the_replacement_window_and_a_second_run_into_the_folder(tmp_path, capsys, monkeypatch):
    """Run A ends with state step-3. Run B (another learning rate, same folder) is killed after it renamed A's
    step-3 aside and before it renamed its own into place. Meanwhile a third run into the folder exits 2
    naming the lock and B's process. Resuming afterwards completes B's replacement (B's state, not A's),
    removes the leftovers and a killed write's temporary file, and trains on."""
    import sdtrain.models.loading as loading

    config = write_config(tmp_path, "run", steps=3)
    run(config)
    root = states_root(tmp_path / "run")
    old = (root / "step-00000003" / ADAPTERS).read_bytes()

    marker = tmp_path / "in-window"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-c", HANG_IN_REPLACEMENT, str(marker), "train", config, "--quiet",
                                "--set", "optimizer.lr=1e-3"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not marker.exists():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        assert not (root / "step-00000003").exists()  # inside the window: only the two hidden copies exist
        new = (root / ".incomplete-step-00000003" / ADAPTERS).read_bytes()
        assert new != old and (root / ".replaced-step-00000003" / ADAPTERS).read_bytes() == old

        def no_weights(*args, **kwargs):
            raise AssertionError("model weights loaded")

        monkeypatch.setattr(loading, "load_base", no_weights)
        capsys.readouterr()
        assert main(["train", config, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"process {process.pid} holds {tmp_path / 'run' / '.sdtrain.lock'}" in err
        monkeypatch.undo()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()

    stale = tmp_path / "run" / ".run.safetensors.k3j_x9a2.tmp"
    stale.write_bytes(b"half a file")
    resumed = run(config, ["optimizer.lr=1e-3", "train.max_steps=5"], resume="latest")
    assert resumed.global_step == 5 and not stale.exists()
    assert (root / "step-00000003" / ADAPTERS).read_bytes() == new
    assert [p.name for p in root.iterdir()] and all(not p.name.startswith(".") for p in root.iterdir())
    assert [p.name for p in complete_states(root)[0]] == ["step-00000003", "step-00000005"]


@pytest.mark.parametrize("left", ["incomplete-only", "replaced-only", "both-complete"])
def test_recover_states_keeps_the_newest_complete_copy(tmp_path, left):
    """Every moment of a replacement, as the folder looks after a kill there."""
    from sdtrain.train.state import COMPLETE, recover_states

    root = tmp_path / "states"

    def state(name, content, complete=True):
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "content").write_text(content)
        if complete:
            (folder / COMPLETE).write_text("ok\n")

    if left == "incomplete-only":  # killed while writing the new one: the old one stays
        state("step-00000004", "old")
        state(".incomplete-step-00000004", "new", complete=False)
        expected = "old"
    elif left == "replaced-only":  # the old one set aside and no complete new one (cannot happen in order)
        state(".replaced-step-00000004", "old")
        state(".incomplete-step-00000004", "new", complete=False)
        expected = "old"
    else:  # killed between the two renames
        state(".replaced-step-00000004", "old")
        state(".incomplete-step-00000004", "new")
        expected = "new"
    notes = recover_states(root)
    assert notes
    assert [p.name for p in root.iterdir()] == ["step-00000004"]
    assert (root / "step-00000004" / "content").read_text() == expected


def test_old_temporaries_in_a_shared_cache_folder_are_removed_fresh_ones_kept(tmp_path):
    """data.cache_dir may be shared with runs into other folders that write into it now: a run removes the
    temporaries there that are older than STALE_SHARED_SECONDS (a killed write's) and keeps younger ones (a
    write in progress); in its own output folder it removes every temporary."""
    from sdtrain.train.output_lock import STALE_SHARED_SECONDS

    config = write_config(tmp_path, "run", steps=2)
    cache = tmp_path / "cache" / "latents"
    cache.mkdir(parents=True)
    old, fresh = cache / ".abc.safetensors.k3j_x9a2.tmp", cache / ".abd.safetensors.q8w_e4r1.tmp"
    for path in (old, fresh):
        path.write_bytes(b"half a file")
    then = time.time() - STALE_SHARED_SECONDS - 60
    os.utime(old, (then, then))
    own = tmp_path / "run" / ".run.safetensors.z1x_c2v3.tmp"
    own.parent.mkdir()
    own.write_bytes(b"half a file")
    os.utime(own, None)
    trainer = run(config)
    assert trainer.global_step == 2
    assert not old.exists() and fresh.exists() and not own.exists()

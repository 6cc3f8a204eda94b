"""Commands run as a user runs them (a subprocess): stderr holds only sdtrain's own lines, no third-party
warnings; `--verbose` shows what is filtered; every written file has the user's normal permissions."""

from __future__ import annotations

import importlib.util
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_training import write_config

PROMPTS = '[sample]\nevery_n_steps = 2\nsteps = 2\nprompts = ["a red square --w 64 --h 64 --d 1"]\n'


def sdtrain(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sdtrain", *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600, preexec_fn=lambda: os.umask(0o022))


def foreign_lines(stderr: str) -> list[str]:
    """stderr lines that are not sdtrain's own (`note:` / `warning:` / `error:`) nor its progress bar."""
    lines = [line.strip() for line in re.split(r"[\r\n]", stderr)]
    return [line for line in lines if line and not re.match(r"(note|warning|error): |training\b", line)]


def private_paths(*folders: Path) -> list[str]:
    """Files not 0644 and folders not 0755 below `folders` (written under umask 022)."""
    found = []
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            expected = 0o755 if path.is_dir() else 0o644
            if stat.S_IMODE(path.stat().st_mode) != expected:
                found.append(f"{path}: {oct(stat.S_IMODE(path.stat().st_mode))}")
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("quiet")
    config = write_config(tmp_path, "run", steps=2, extra=PROMPTS)
    done = sdtrain("train", config)
    return tmp_path, done


def test_train_prints_no_third_party_warnings(trained):
    tmp_path, done = trained
    assert done.returncode == 0, done.stderr[-3000:]
    assert foreign_lines(done.stderr) == []
    assert "saved " in done.stdout


def test_train_writes_every_file_with_normal_permissions(trained):
    tmp_path, done = trained
    out = tmp_path / "run"
    written = {p.relative_to(out).parts[0] for p in out.rglob("*") if p.is_file()}
    assert {"run.safetensors", "run.resolved.toml", "samples", "states", "loss_log.csv"} <= written, written
    assert list((tmp_path / "cache").rglob("*.safetensors"))
    assert private_paths(out, tmp_path / "cache") == []


def test_merge_to_a_folder_is_quiet_and_readable(trained, tmp_path):
    adapter = trained[0] / "run" / "run.safetensors"
    done = sdtrain("merge", adapter, "--base", "builtin:tiny-sdxl", "--out", tmp_path / "merged")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""
    assert private_paths(tmp_path / "merged") == []


def test_verbose_shows_what_is_filtered(trained, tmp_path):
    adapter = trained[0] / "run" / "run.safetensors"
    done = sdtrain("merge", adapter, "--base", "builtin:tiny-sdxl", "--out", tmp_path / "merged", "--verbose")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "should be kept in float32: []" in done.stderr
    assert "Writing model shards" in done.stderr
    if importlib.util.find_spec("torchvision") is None:  # transformers only says it when torchvision is missing
        assert "requires torchvision (not installed)" in done.stderr

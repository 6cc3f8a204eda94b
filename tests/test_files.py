"""Written files get the user's normal permissions (the umask's), not mkstemp's or safetensors' 0600."""

import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch

from sdtrain.files import (
    atomic_save_safetensors, atomic_write_bytes, current_umask, fsync_tree, give_normal_modes, new_file_mode,
)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test (and put the old one back)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda value: os.umask(value)
    os.umask(old)


def test_current_umask_reads_the_process_umask(umask):
    for value in (0o022, 0o077, 0o002):
        umask(value)
        assert current_umask() == value
        assert new_file_mode() == 0o666 & ~value


def test_atomic_writes_get_the_umask_mode(tmp_path, umask):
    umask(0o022)
    raw = atomic_write_bytes(tmp_path / "a.toml", b"x = 1\n")
    tensors = atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    assert mode(raw) == 0o644 and mode(tensors) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left

    umask(0o077)  # a user who wants private files gets them
    assert mode(atomic_write_bytes(tmp_path / "private.toml", b"")) == 0o600

    umask(0o022)  # replacing a file writes it with the normal mode too
    assert mode(atomic_write_bytes(tmp_path / "private.toml", b"y = 2\n")) == 0o644


def test_trees_from_other_libraries_get_normal_modes(tmp_path, umask):
    umask(0o022)
    tree = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as merge's staging folder
    (tree / "unet").mkdir()
    private = tree / "unet" / "weights.safetensors"
    private.write_bytes(b"0")
    os.chmod(private, 0o600)  # what safetensors 0.8 leaves
    give_normal_modes(tree)
    assert mode(tree) == 0o755 and mode(tree / "unet") == 0o755 and mode(private) == 0o644

    state = tmp_path / "state"  # fsync_tree finishes a training-state folder before it is renamed into place
    state.mkdir()
    (state / "adapters.safetensors").write_bytes(b"0")
    os.chmod(state / "adapters.safetensors", 0o600)
    fsync_tree(state)
    assert mode(state / "adapters.safetensors") == 0o644

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


# Writes under a real file-size limit in a fresh process (SIGXFSZ would kill it unless sdtrain ignores it).
UNDER_SIZE_LIMIT = """
import resource, sys, torch
from pathlib import Path
from sdtrain.files import WriteError, atomic_save_safetensors, atomic_write_bytes
folder = Path(sys.argv[1])
atomic_write_bytes(folder / "old.bin", b"previous")
resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.RLIM_INFINITY))
for write in (lambda: atomic_write_bytes(folder / "old.bin", b"x" * 100_000),
              lambda: atomic_save_safetensors({"w": torch.zeros(50_000)}, folder / "new.safetensors")):
    try:
        write()
    except WriteError as error:
        print(error)
"""


def test_write_faults_keep_the_previous_file_and_name_the_fix(tmp_path):
    """EFBIG from a real `ulimit -f`, for raw bytes and for safetensors (its Rust error carries the errno):
    WriteError naming the file, the limit and the fix; the previous file intact; no temporary left."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", UNDER_SIZE_LIMIT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    assert lines[0].startswith(f"cannot write {tmp_path / 'old.bin'}: this process may write files of at most "
                               "16.0 KiB (ulimit -f) (it needs about 97.7 KiB); the previous old.bin is kept")
    assert lines[1].startswith(f"cannot write {tmp_path / 'new.safetensors'}: this process may write files of at most")
    assert "nothing was written" in lines[1] and "ulimit -f unlimited" in lines[1]
    assert (tmp_path / "old.bin").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.bin"]


def test_read_only_folder_is_a_write_error(tmp_path):
    """A real read-only bind mount when this machine allows mounting (root); skipped elsewhere."""
    import subprocess

    from sdtrain.files import WriteError

    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "old.bin").write_bytes(b"previous")
    if subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount here")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True)
        with pytest.raises(WriteError, match="read-only filesystem; the previous old.bin is kept. Choose a writable"):
            atomic_write_bytes(folder / "old.bin", b"new")
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
    assert (folder / "old.bin").read_bytes() == b"previous"

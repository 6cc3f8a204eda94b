"""Crash-safe file writes: a temporary file in the target's folder, flushed to disk, renamed into place.

A reader (or a run killed half-way) sees the old file or the new one, never a torn one; a failed write
leaves the previous file untouched and removes its temporary.

Permissions: every file sdtrain writes gets the mode any new file of the user's gets (0o666 less the umask,
e.g. 0644 under umask 022), so a UI running as another user can read it. Temporary files are created 0600
(`mkstemp`), and safetensors 0.8 writes 0600 too (it writes through a temporary file of its own), so the
writers here set the mode before a file is renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def new_folder_mode() -> int:
    """The mode `mkdir` gives a new folder: 0o777 less the umask."""
    return 0o777 & ~current_umask()


def give_normal_modes(folder: str | os.PathLike) -> None:
    """Give `folder` and everything below it the modes a new folder / file of the user's gets (for trees that
    other libraries wrote with private modes, e.g. a `mkdtemp` folder or safetensors files)."""
    folder = Path(folder)
    file_mode, folder_mode = new_file_mode(), new_folder_mode()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, folder_mode if path.is_dir() else file_mode)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file below `folder` and the folder itself, first giving them the user's normal modes
    (`give_normal_modes`): the folder is about to be renamed into place, as `atomic_write` does with a file."""
    give_normal_modes(folder)
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(temporary path)`, flush the result, rename it over `path` and flush the folder.

    The file gets the mode of any new file of the user's (`new_file_mode`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    return atomic_write(path, write)


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file` made atomic (streams to the temporary file, no copy in memory)."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

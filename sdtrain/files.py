"""Crash-safe file writes: a temporary file in the target's folder, flushed to disk, renamed into place.

A reader (or a run killed half-way) sees the old file or the new one, never a torn one; a failed write
leaves the previous file untouched and removes its temporary.

Faults: a full disk, a quota, the process's file-size limit (`ulimit -f`), a read-only filesystem or a folder
without write permission raise `WriteError` (a `UserError`: exit 2) naming the file, what went wrong, how much
space the file needs where that is known, and that the previous file is kept. sdtrain ignores SIGXFSZ while it
writes (`ignore_file_size_signal`): the signal's default action kills the process without a word when a file
reaches the size limit; ignored, the write fails with EFBIG and becomes that message.

Permissions: every file sdtrain writes gets the mode any new file of the user's gets (0o666 less the umask,
e.g. 0644 under umask 022), so a UI running as another user can read it. Temporary files are created 0600
(`mkstemp`), and safetensors 0.8 writes 0600 too (it writes through a temporary file of its own), so the
writers here set the mode before a file is renamed into place.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from sdtrain.errors import UserError

# errno values of a write that failed because of where it writes, not because of a bug: reported as WriteError
WRITE_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


class WriteError(UserError):
    """A file or folder could not be written: disk full, quota, file-size limit, read-only, no permission.
    The previous file (or folder) at the path is kept."""

    def __init__(self, message: str, path=None, needed: int | None = None):
        super().__init__(message)
        self.path = path
        self.needed = needed


def human_bytes(count: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} bytes" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError


def existing_folder(path: str | os.PathLike) -> Path:
    """`path` or its nearest ancestor that exists (where a folder to be created would live)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path if path.is_dir() else path.parent


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (for this user) on the filesystem that holds or would hold `path`; None if unknown."""
    try:
        return shutil.disk_usage(existing_folder(path)).free
    except OSError:
        return None


def file_size_limit() -> int | None:
    """This process's file-size limit (RLIMIT_FSIZE, `ulimit -f`) in bytes; None when unlimited or unknown."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def ignore_file_size_signal() -> None:
    """Ignore SIGXFSZ, so a write beyond the file-size limit fails with EFBIG (reported as `WriteError`)
    instead of killing the process. Only the main thread can set signal handlers; elsewhere this does
    nothing. A handler someone else installed is left alone."""
    if not hasattr(signal, "SIGXFSZ") or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGXFSZ) == signal.SIG_DFL:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def fault_errno(error: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the "(os error N)" that safetensors' (Rust) errors carry."""
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"\(os error (\d+)\)", str(error))
    return int(found.group(1)) if found else None


def write_fault(error: BaseException, path: str | os.PathLike, needed: int | None = None,
                kept: str | None = None) -> WriteError | None:
    """The `WriteError` for an error of writing `path` (needing about `needed` bytes), or None when the
    error is not a write fault. `kept` says what stays (default: the previous file at `path`)."""
    code = fault_errno(error)
    if code not in WRITE_FAULTS:
        return None
    path = Path(path)
    folder = existing_folder(path.parent)
    size = f" (it needs about {human_bytes(needed)})" if needed else ""
    kept = kept if kept is not None else (f"the previous {path.name} is kept" if path.exists() else "nothing was written")
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(folder)
        where = f"{human_bytes(free)} free in {folder}" if free is not None else f"in {folder}"
        what = "no space left on the device" if code == errno.ENOSPC else "the disk quota is used up"
        message = (f"cannot write {path}: {what} ({where}){size}; {kept}. Free some space there or write to "
                   "another disk")
    elif code == errno.EFBIG:
        limit = file_size_limit()
        why = (f"this process may write files of at most {human_bytes(limit)} (ulimit -f)" if limit is not None
               else "the file is larger than the filesystem allows")
        fix = "raise the limit (`ulimit -f unlimited` in the shell that starts sdtrain)" if limit is not None \
            else "write to a filesystem that holds larger files"
        message = f"cannot write {path}: {why}{size}; {kept}. {fix[0].upper()}{fix[1:]}"
    elif code == errno.EROFS:
        message = f"cannot write {path}: {folder} is on a read-only filesystem; {kept}. Choose a writable folder"
    else:
        message = (f"cannot write {path}: no permission to write in {folder} ({os.strerror(code)}); {kept}. Fix "
                   "the folder's permissions or choose another folder")
    return WriteError(message, path, needed)


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


TEMPORARY_SUFFIX = ".tmp"  # atomic_write's temporary files: ".<name>.<random>.tmp" beside the target


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], size: int | None = None) -> Path:
    """Call `write(temporary path)`, flush the result, rename it over `path` and flush the folder.

    The file gets the mode of any new file of the user's (`new_file_mode`). A write fault (see
    `write_fault`; `size`, the file's expected size, goes into its message) raises `WriteError`; the
    temporary file is removed and the previous file at `path` stays.
    """
    path = Path(path)
    ignore_file_size_signal()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = new_file_mode()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        fault = write_fault(error, path, size) if isinstance(error, Exception) else None
        if fault is not None:
            raise fault from error
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    return atomic_write(path, write, size=len(data))


def safetensors_size(tensors: dict, metadata: dict[str, str] | None = None) -> int:
    """About the size of the safetensors file of `tensors` (the header estimated)."""
    header = 64 + sum(len(name) + 64 for name in tensors) + sum(len(k) + len(v) + 8 for k, v in (metadata or {}).items())
    return header + sum(t.numel() * t.element_size() for t in tensors.values())


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file` made atomic (streams to the temporary file, no copy in memory)."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata),
                        size=safetensors_size(tensors, metadata))

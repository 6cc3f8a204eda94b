"""One run per output folder: the lock, and the cleanup of what killed runs left in the folder.

A run holds an exclusive POSIX record lock (`fcntl.lockf`) on `<output_dir>/.sdtrain.lock` (the main process,
from setup to the end of `Trainer.run`) and writes its process id into it. The lock belongs to the process, not
to the descriptor: forked children (the data loader's workers) do not hold it, so a killed run's workers, which
outlive it for a moment, do not keep the folder locked. A second run into the same folder exits with code 2
naming the lock file and that process. The lock is released by the operating system when the process
ends, however it ends, so a killed run never leaves a stale lock. A process that already holds the lock
(a script that trains twice into one folder) takes it again. Where `fcntl` is missing (Windows), runs are
not locked.

Under the lock nothing else writes to the folder, so `remove_stale_temporaries` deletes the temporary files
of writes that a kill interrupted (`files.atomic_write`'s `.<name>.<random>.tmp`), and
`sdtrain.train.state.recover_states` finishes or removes interrupted state saves. A cache folder
(`data.cache_dir`) may be shared by runs into other folders, which may be writing into it now: there only
temporaries older than `STALE_SHARED_SECONDS` are deleted (writing one cache entry takes seconds).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sdtrain.errors import UserError

LOCK_NAME = ".sdtrain.lock"
_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{6,}\.tmp")  # tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")
STALE_SHARED_SECONDS = 6 * 3600  # age above which a temporary in a shared cache folder is a killed write's
_held: dict[Path, int] = {}  # folders this process has locked: their lock file descriptors


class OutputDirBusy(UserError):
    """Another run writes into the same output folder."""


def lock_output_dir(folder) -> Path | None:
    """Take the lock of `folder` (created if missing) or raise `OutputDirBusy`; returns the lock file (None
    where locks are not supported)."""
    try:
        import fcntl
    except ImportError:
        return None
    folder = Path(os.path.abspath(folder))
    path = folder / LOCK_NAME
    if folder in _held:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutputDirBusy(f"train.output_dir {folder} is in use by another sdtrain run (process {holder} holds "
                            f"{path}); wait for that run to end or stop it, or set another train.output_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[folder] = fd
    return path


def unlock_output_dir(folder) -> None:
    """Release the lock `lock_output_dir` took (nothing when this process does not hold it)."""
    fd = _held.pop(Path(os.path.abspath(folder)), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock


def remove_stale_temporaries(folder, skip=(), older_than: float | None = None) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes in `folder` and below, except in the folders
    `skip` (a cache other runs may share) and, with `older_than`, those modified less than that many seconds
    ago; call under the lock. Returns them."""
    import time

    removed = []
    skipped = {os.path.abspath(path) for path in skip if path is not None}
    now = time.time()
    for parent, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if os.path.abspath(os.path.join(parent, name)) not in skipped]
        for name in names:
            if _TEMPORARY.fullmatch(name):
                path = Path(parent) / name
                try:
                    if older_than is not None and now - path.stat().st_mtime < older_than:
                        continue
                    path.unlink()
                except OSError:
                    continue
                removed.append(path)
    return removed

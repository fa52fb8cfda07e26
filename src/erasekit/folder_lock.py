"""One writer per output folder: an advisory lock on ``<folder>/.erasekit.lock``.

``with hold_folder(out):`` takes an exclusive `fcntl.flock` on the lock file, or fails (after waiting up to
``wait_s`` seconds) with an `ErasekitError` naming the process that holds it. The kernel releases a flock
when its holder exits in any way, SIGKILL included, so a crashed run never leaves the folder locked; the lock
file itself stays (deleting it would let two processes lock two different files of the same name).

Within one process the lock is re-entrant (a nested ``hold_folder`` of the same folder is a no-op), and
`is_held` says whether this process holds it. Taking the lock then checks the folder (`erasekit.folder_check`:
links where erasekit writes are refused, stale temporary files cleared); the lock file is never opened through
a link (it is truncated, which would truncate the link's target).
Locks are advisory and local: they do not protect against programs that ignore them, nor across NFS clients.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from erasekit.errors import ErasekitError

LOCK_FILE = ".erasekit.lock"
POLL_S = 0.1

_held: dict[Path, list] = {}  # resolved folder -> [fd, depth]


def _key(folder) -> Path:
    return Path(folder).expanduser().resolve()


def is_held(folder) -> bool:
    """Whether this process holds ``folder``'s lock."""
    try:
        return _key(folder) in _held
    except (OSError, RuntimeError):
        return False


def lock_holder(folder) -> int | None:
    """The pid recorded in ``folder``'s lock file (whoever holds or last held it), or None."""
    try:
        text = (Path(folder) / LOCK_FILE).read_text().strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise


@contextmanager
def hold_folder(path, wait_s: float = 0) -> Iterator[Path]:
    """Hold the write lock of folder ``path`` (created if missing) for the ``with`` block.

    ``wait_s``: how long to wait for another process to release it (0: fail at once).
    """
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ErasekitError(f"{folder} exists and is not a folder")
    try:
        wait_s = float(wait_s)
    except (TypeError, ValueError):
        raise ErasekitError(f"wait_s must be a number of seconds, got {wait_s!r}") from None
    if not wait_s >= 0:  # negative or NaN; inf waits for ever
        raise ErasekitError(f"wait_s must be >= 0, got {wait_s}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ErasekitError(f"cannot create the output folder {folder}: {exc.strerror or exc}") from None
    key = _key(folder)
    if key in _held:  # re-entrant within this process
        _held[key][1] += 1
        try:
            yield folder
        finally:
            _held[key][1] -= 1
        return
    lock_path = folder / LOCK_FILE
    try:
        # Never through a link: the lock file is truncated below, which would truncate a link's target.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ErasekitError(f"the lock file {lock_path} is a symbolic link: erasekit does not write through "
                                f"links in an output folder; remove it") from None
        raise ErasekitError(f"cannot open the lock file {lock_path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ErasekitError(f"the lock file {lock_path} is not a regular file; remove it")
    try:
        deadline = time.monotonic() + wait_s
        while not _try_lock(fd):
            left = deadline - time.monotonic()
            if left <= 0:
                pid = lock_holder(folder)
                raise ErasekitError(
                    f"another erasekit process is writing to {folder} (pid {pid if pid is not None else 'unknown'}); "
                    f"wait for it or choose another --out"
                )
            time.sleep(min(POLL_S, left))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        # Now that no other erasekit process writes here: refuse links where erasekit writes, clear stale temps.
        from erasekit.folder_check import prepare_folder

        prepare_folder(folder)
    except BaseException:
        os.close(fd)
        raise
    _held[key] = [fd, 1]
    try:
        yield folder
    finally:
        del _held[key]
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the only descriptor releases the flock

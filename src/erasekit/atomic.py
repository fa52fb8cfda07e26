"""Whole-or-nothing file writes: write a temporary file beside the target, fsync it, rename it over the target.

A reader (or a run resumed after a crash) then sees either the old file or the complete new one, never a
partial one. Temporary names are ``.<name>.<pid>.tmp``, so a crash leaves at most such a hidden file behind,
which `remove_stale_temps` clears (and `erasekit.folder_check` when a run takes the folder's lock).

Links (issue #18): the temporary file is created afresh (``O_EXCL | O_NOFOLLOW``: a link planted under its name
is removed, never written through), and the rename replaces a link at ``path`` by the new file, so the file a link
pointed to is never touched. A full disk becomes `DiskFullError` naming the file: one line, and the run resumes.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Callable, Mapping

from erasekit.errors import ErasekitError

TEMP_RE = re.compile(r"^\..+\.(\d+)\.tmp$")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("no space left", "storagefull", "disk quota exceeded", "os error 28")


class DiskFullError(ErasekitError):
    """No space left on the device while writing a file; the run can be resumed once there is space."""

    def __init__(self, path=None):
        where = f" while writing {path}" if path is not None else ""
        super().__init__(f"the disk is full (no space left on the device{where}); free some space and run the same "
                         f"command again: it resumes where it stopped")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` means a full disk or quota: an OSError ENOSPC / EDQUOT, or a library error that says so
    (safetensors reports a Rust IoError in its message)."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    text = str(exc).lower()
    return any(t in text for t in _DISK_FULL_TEXT)


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where directories cannot be opened)."""
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


def _fresh(tmp: Path) -> None:
    """Create ``tmp`` as a new empty regular file of ours: whatever has its name (a stale file, a planted link) is
    removed first (unlinking a link never touches its target), and creation never follows a link."""
    for _ in range(3):
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
            return
        except FileExistsError:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
    raise ErasekitError(f"cannot create the temporary file {tmp}: something keeps recreating it")


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path, then fsync and rename it to ``path``."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        _fresh(tmp)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ErasekitError(f"{tmp} was replaced while it was written; not renaming it to {path}")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if not isinstance(exc, ErasekitError) and isinstance(exc, Exception) and is_disk_full(exc):
            raise DiskFullError(path) from None
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_save_safetensors(tensors: Mapping, path, metadata: dict | None = None) -> Path:
    """`safetensors.torch.save_file`, atomically."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=metadata))


def remove_stale_temps(folder, max_age_s: float | None = None) -> list[Path]:
    """Delete ``.<name>.<pid>.tmp`` files in ``folder`` whose writing process is gone (or, with ``max_age_s``,
    that are older than that: a pid may have been reused); returns them. Links of that name are removed too
    (unlinking a link never touches its target)."""
    import time

    removed = []
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return removed
    now = time.time()
    for p in folder.iterdir():
        m = TEMP_RE.match(p.name)
        if m is None:
            continue
        try:
            st = p.lstat()
        except OSError:
            continue
        old = max_age_s is not None and now - st.st_mtime > max_age_s
        if stat.S_ISDIR(st.st_mode) or (_alive(int(m.group(1))) and not old):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists (another user's) or not a pid we can judge: leave the file alone
    return True

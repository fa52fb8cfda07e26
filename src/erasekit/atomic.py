"""Whole-or-nothing file writes: write a temporary file beside the target, fsync it, rename it over the target.

A reader (or a run resumed after a crash) then sees either the old file or the complete new one, never a
partial one. Temporary names are ``.<name>.<pid>.tmp``, so a crash leaves at most such a hidden file behind,
which `remove_stale_temps` clears.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Mapping

TEMP_RE = re.compile(r"^\..+\.(\d+)\.tmp$")


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


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path, then fsync and rename it to ``path``."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_save_safetensors(tensors: Mapping, path, metadata: dict | None = None) -> Path:
    """`safetensors.torch.save_file`, atomically."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=metadata))


def remove_stale_temps(folder) -> list[Path]:
    """Delete ``.<name>.<pid>.tmp`` files in ``folder`` whose writing process is gone; returns them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = TEMP_RE.match(p.name)
        if m is None or _alive(int(m.group(1))):
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

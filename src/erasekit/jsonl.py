"""Append-only JSON-lines files that survive a crash at any byte.

A record is one line: ``json.dumps(record) + "\\n"``, written with one ``os.write`` call per batch of records,
then fsynced. A process killed (or a machine crashed) in the middle of a write leaves at most a torn last
line: bytes after the last newline. Readers skip it (and report it); `append_jsonl` repairs it before writing,
so a new record never joins a torn one:

* a tail that parses as a complete JSON object (only its newline is missing) gets its newline;
* any other tail is cut off (the file is truncated back to its last newline).

An unparseable line in the middle of a file (written by an older erasekit that appended onto a torn line) is
reported and skipped; when it ends with a complete record (the one appended onto the torn line), that record
is recovered.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from erasekit.errors import ErasekitError

log = logging.getLogger("erasekit")

TAIL_CHUNK = 1 << 16


@dataclass
class JsonlScan:
    """What `scan_jsonl` found: the records, and the lines it could not read (1-based numbers, reasons)."""

    records: list[dict] = field(default_factory=list)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    torn_tail: bool = False  # the file ends with an incomplete line (dropped)
    recovered: int = 0  # records salvaged from the end of an otherwise unparseable line

    @property
    def clean(self) -> bool:
        return not self.bad_lines and not self.torn_tail


def _decode(line: bytes) -> dict | None:
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return rec if isinstance(rec, dict) else None


def _salvage(line: bytes) -> dict | None:
    """The complete JSON object that ends ``line``, if one does: a record appended onto a torn one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        text = line.decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    start = text.find("{", 1)
    while start != -1:
        try:
            rec, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            rec, end = None, -1
        if isinstance(rec, dict) and text[end:].strip() == "":
            return rec
        start = text.find("{", start + 1)
    return None


def scan_jsonl(path) -> JsonlScan:
    """Read ``path`` (missing: empty), keeping every line that is a JSON object."""
    scan = JsonlScan()
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return scan
    except IsADirectoryError:
        raise ErasekitError(f"{path} is a folder, not a JSON-lines file: move it away") from None
    except OSError as exc:
        raise ErasekitError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = _decode(line)
        if rec is None:
            rec = _salvage(line)
            scan.bad_lines.append((number, "unparseable" + ("; the record at its end was recovered" if rec else "")))
            if rec is None:
                continue
            scan.recovered += 1
        scan.records.append(rec)
    if tail.strip():
        rec = _decode(tail)
        if rec is not None:  # complete; only the newline is missing
            scan.records.append(rec)
        else:
            scan.torn_tail = True
            scan.bad_lines.append((len(lines) + 1, f"torn last line ({len(tail)} bytes)"))
    return scan


def read_jsonl(path) -> list[dict]:
    """The records of ``path`` (a JSON object per line); unreadable lines are skipped and logged as warnings."""
    scan = scan_jsonl(path)
    for number, reason in scan.bad_lines:
        log.warning("%s, line %d: %s; skipped", path, number, reason)
    return scan.records


def _tail_start(fd: int, size: int) -> int:
    """Offset just after the last newline of the file (0 when it has none)."""
    end = size
    while end > 0:
        start = max(0, end - TAIL_CHUNK)
        chunk = os.pread(fd, end - start, start)
        i = chunk.rfind(b"\n")
        if i != -1:
            return start + i + 1
        end = start
    return 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def repair_tail(fd: int, path="") -> str | None:
    """Make the file end with a newline (see the module doc); returns what was done, or None."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return None
    start = _tail_start(fd, size)
    tail = os.pread(fd, size - start, start)
    if _decode(tail) is not None:
        os.lseek(fd, 0, os.SEEK_END)
        _write_all(fd, b"\n")
        return "added the missing newline after the last record"
    os.ftruncate(fd, start)
    log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted write", path, size - start)
    return f"dropped a torn last line ({size - start} bytes)"


def open_for_append(path: Path) -> int:
    """A read-write descriptor of the regular file ``path`` (created if missing), never through a link: results
    folders are shared, and appending through a planted link would modify the file it points to."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ErasekitError(f"{path} is a symbolic link: erasekit does not write through links in an output "
                                f"folder; remove it") from None
        if exc.errno == errno.EISDIR:
            raise ErasekitError(f"{path} is a folder, not a JSON-lines file: move it away") from None
        from erasekit.atomic import DiskFullError, is_disk_full

        if is_disk_full(exc):
            raise DiskFullError(path) from None
        raise ErasekitError(f"cannot open {path} for writing: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ErasekitError(f"{path} is not a regular file; move it away")
    return fd


def dumps_line(record: dict) -> bytes:
    """One record as a line (``sort_keys``, ASCII only, so a line never holds a raw newline or a split character)."""
    if not isinstance(record, dict):
        raise TypeError(f"a JSON-lines record must be a dict, got {type(record).__name__}")
    return (json.dumps(record, sort_keys=True) + "\n").encode("ascii")


def append_jsonl(path, records: Iterable[dict], *, fsync: bool = True) -> int:
    """Append ``records`` to ``path`` (created if missing) as whole lines, after repairing a torn tail; one
    write call for all of them, then fsync. Returns the number of records written.

    One writer at a time (see `erasekit.folder_lock`): two concurrent appenders could each repair the other's
    line in flight.
    """
    from erasekit.atomic import DiskFullError, is_disk_full

    data = b"".join(dumps_line(r) for r in records)
    path = Path(path)
    created = not path.exists()
    fd = open_for_append(path)
    try:
        repair_tail(fd, path)
        if data:
            _write_all(fd, data)
        if fsync:
            os.fsync(fd)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(path) from None
        raise
    finally:
        os.close(fd)
    if created and fsync:
        from erasekit.atomic import fsync_dir

        fsync_dir(path.parent)
    return data.count(b"\n")

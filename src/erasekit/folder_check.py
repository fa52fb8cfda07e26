"""What a run checks in its output folder once it holds the folder's lock (`erasekit.folder_lock.hold_folder`).

* Links: results folders are shared between people, and a symbolic link planted where erasekit writes would make
  it write into the link's target. Every entry erasekit writes (its index, lock, summary and report files, and
  everything under ``images/``, ``report/`` and ``cache/``) must not be a link: one that is is refused, naming it.
  (Whole-file writes replace a link rather than write through it, and appends open with ``O_NOFOLLOW``; this
  check makes the refusal come before any work.)
* Files that are not files: an ``images.jsonl`` (or any file erasekit writes) that is a folder is refused here,
  before any work, not when the first batch is appended.
* Stale temporary files: a run killed (or out of disk) in the middle of a write leaves ``.<name>.<pid>.tmp``
  behind; those of processes that are gone, or older than a day, are removed here.

Only erasekit's own subtrees are walked, at most `MAX_DEPTH` levels and `MAX_ENTRIES` entries, so pointing
``--out`` at a large folder stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

from erasekit.errors import ErasekitError

# Files and folders erasekit writes directly inside an output folder (generate, attack, erase, bench, report).
OWN_FILES = ("images.jsonl", "grid.png", "scores.jsonl", "summary.json", "config.json", "results.jsonl",
             "costs.jsonl", "report.md", "report.html", "edit.json", "edit.safetensors", "erasekit_edit.json")
OWN_DIRS = ("images", "report", "cache")
MAX_DEPTH = 5
MAX_ENTRIES = 500_000
STALE_AGE_S = 24 * 3600


def _refuse(path: Path) -> None:
    raise ErasekitError(f"{path} is a symbolic link: erasekit does not write through links in an output folder "
                        f"(results folders are shared); remove it, or choose another --out")


def prepare_folder(folder) -> list[Path]:
    """Refuse links where erasekit writes in ``folder``; remove stale temporary files. Returns the removed files."""
    from erasekit.atomic import TEMP_RE, remove_stale_temps
    from erasekit.image_store import STORE_NAME_RE

    folder = Path(folder)
    removed = remove_stale_temps(folder, STALE_AGE_S)
    try:
        top = list(os.scandir(folder))
    except OSError:
        return removed
    walk: list[tuple[Path, int]] = []
    for entry in top:
        own = entry.name in OWN_FILES or entry.name in OWN_DIRS or STORE_NAME_RE.match(entry.name)
        if not own:
            continue
        if entry.is_symlink():
            _refuse(folder / entry.name)
        if entry.name in OWN_FILES and not entry.is_file(follow_symlinks=False):  # found now, not after the work
            raise ErasekitError(f"{folder / entry.name} is a folder (or another non-file) where erasekit writes a "
                                f"file; move it away, or choose another --out")
        if entry.name in OWN_DIRS and entry.is_dir(follow_symlinks=False):
            walk.append((folder / entry.name, 1))
    seen = 0
    while walk:
        sub, depth = walk.pop()
        try:
            entries = list(os.scandir(sub))
        except OSError:
            continue
        stale = False
        for entry in entries:  # one listing per folder: d_type answers is_symlink / is_dir without a stat
            seen += 1
            if seen > MAX_ENTRIES:
                return removed
            if entry.name.endswith(".tmp") and TEMP_RE.match(entry.name):
                stale = True  # temp files (links included) are the cleaner's, below
            elif entry.is_symlink():
                _refuse(sub / entry.name)
            elif depth < MAX_DEPTH and entry.is_dir(follow_symlinks=False):
                walk.append((sub / entry.name, depth + 1))
        if stale:
            removed += remove_stale_temps(sub, STALE_AGE_S)
    return removed

"""Paths read from results files: whether one names a file inside its folder."""

from __future__ import annotations

from pathlib import Path


def inside(folder, rel) -> bool:
    """Whether ``rel`` (a path read from a results file) names a file inside ``folder``: relative, without ``..``,
    and not leading out of it through a link."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return False
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("~"):
        return False
    root = Path(folder).resolve()
    try:
        return (root / p).resolve().is_relative_to(root)
    except (OSError, RuntimeError, ValueError):
        return False

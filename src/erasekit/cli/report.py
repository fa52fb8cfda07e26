"""`erasekit report DIR`: rebuild summary.json, report.md and report.html of a bench results folder."""

from __future__ import annotations

from pathlib import Path

import typer


def report(folder: Path = typer.Argument(..., help="A results folder written by `erasekit bench`.")) -> None:
    """Rebuild the report (tables, plots, image grids) of a benchmark results folder from its files."""
    from erasekit.bench.results import rebuild
    from erasekit.folder_lock import hold_folder
    from erasekit.report.markdown import crr_markdown

    from erasekit.errors import ErasekitError

    if not folder.is_dir():
        raise ErasekitError(f"{folder}: no such folder")
    with hold_folder(folder):
        summary = rebuild(folder)
    print(crr_markdown(summary))
    print(f"report: {folder / 'report.html'}")

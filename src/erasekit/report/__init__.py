"""The benchmark report: report.md and report.html (Jinja2, autoescaped) with image grids and matplotlib plots.

`write_report(out, summary, rows)` writes, into a results folder: ``report.md``, ``report.html`` and ``report/``
(``crr_by_scenario.png``, ``crr_vs_preservation.png``, ``grids/<cell>.png``). Everything is referenced by relative
paths, so the folder can be moved or zipped whole.
"""

from __future__ import annotations

from pathlib import Path


def write_report(out, summary: dict, rows: list[dict]) -> dict:
    from erasekit.report.html import write_html
    from erasekit.report.markdown import write_markdown
    from erasekit.report.plots import write_grids, write_plots

    out = Path(out)
    (out / "report").mkdir(parents=True, exist_ok=True)
    plots = write_plots(out, summary)
    grids = write_grids(out, summary, rows)
    write_markdown(out, summary, plots)
    write_html(out, summary, plots, grids, rows)
    return {"plots": plots, "grids": grids}


__all__ = ["write_report"]

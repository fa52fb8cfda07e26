"""`erasekit bench`: the whole loop (erase, attack every scenario, measure, report) from one YAML config."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from erasekit.cli import common


def bench(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="A shipped preset (quick, full, the paper-* protocols, one per results table; erasekit ls lists them) or a YAML file; default: quick."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", parser=common.out_folder, metavar="DIR", help="Results folder; default: a new folder under runs/. Rerunning with the same --out resumes."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Change a config value by its dotted path (repeat): images_per_cell=8, sampler.steps=10, attacks.ti.steps=50, methods.1.settings.epochs=1."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars with time estimates per stage."),
) -> None:
    """Benchmark erasure methods against every attack scenario: CRR tables, preservation, cost and an HTML report."""
    from erasekit.bench.spec import load_config

    cfg = load_config(preset, common.parse_sets(set_))  # every value checked before a model is loaded
    if out is None:
        out = Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    from erasekit.bench.layout import check_out
    from erasekit.bench.run import run_bench

    common.check_path_names("--out", out)
    check_out(out, cfg)
    summary = run_bench(cfg, out, progress=progress, log=lambda m: print(m, file=sys.stderr))
    if summary:
        from erasekit.report.markdown import crr_markdown

        print(crr_markdown(summary))
        print(f"report: {out / 'report.html'}")

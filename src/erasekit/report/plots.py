"""matplotlib plots (Agg backend, PNG) and image grids of a benchmark report."""

from __future__ import annotations

from pathlib import Path

from erasekit.report.format import preservation_rows


def plain(text) -> str:
    """``text`` drawn as written: "$" escaped so matplotlib never reads a label as mathtext (a method named
    ``a$x^$b`` would otherwise fail the whole report after all the work)."""
    return str(text).replace("$", r"\$")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Whole or not at all, and never through a link at ``path`` (`erasekit.atomic`)."""
    from erasekit.atomic import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))


def write_plots(out: Path, summary: dict) -> dict[str, str]:
    """``report/crr_by_scenario.png`` (bars: CRR per scenario per method, Wilson intervals as error bars, one panel
    per concept) and ``report/crr_vs_preservation.png`` (mean CRR against non-target prompt following)."""
    import numpy as np

    plt = _plt()
    written = {}
    concepts, methods, scenarios = summary["concepts"], summary["methods"], summary["scenarios"]
    crr = summary["tables"]["crr"]
    fig, axes = plt.subplots(len(concepts), 1, figsize=(max(6, 1.3 * len(scenarios) * max(1, len(methods)) / 3), 3.2 * len(concepts)),
                             squeeze=False)
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(scenarios))
    for ax, concept in zip(axes[:, 0], concepts):
        for i, method in enumerate(methods):
            cells = [crr.get(concept, {}).get(method, {}).get(s) for s in scenarios]
            vals = np.array([100 * c["crr"] if c and c.get("crr") is not None else np.nan for c in cells])
            low = np.array([100 * c["ci"][0] if c else np.nan for c in cells])
            high = np.array([100 * c["ci"][1] if c else np.nan for c in cells])
            err = np.vstack([np.nan_to_num(vals - low), np.nan_to_num(high - vals)])
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, np.nan_to_num(vals), width, yerr=err, capsize=2,
                   label=plain(method))
            for xi, c in zip(x + (i - (len(methods) - 1) / 2) * width, cells):
                if c and c.get("crr") is None and c.get("invalid"):  # no rate, not 0%: every image degenerate
                    ax.text(xi, 1, "invalid", rotation=90, ha="center", va="bottom", fontsize=7, color="#a00")
        ax.set_xticks(x, [plain(s) for s in scenarios])
        ax.set_ylim(0, 105)
        ax.set_ylabel("CRR (%)")
        ax.set_title(plain(f"concept: {concept}"))
    axes[0, 0].legend(fontsize=8, ncol=min(len(methods), 6), loc="lower center", bbox_to_anchor=(0.5, 1.12))
    fig.tight_layout()
    path = out / "report" / "crr_by_scenario.png"
    _save(fig, path)
    plt.close(fig)
    written["crr_by_scenario"] = "report/crr_by_scenario.png"

    points = [r for r in preservation_rows(summary) if r["mean_crr"] is not None and r["following_rate"] is not None]
    if points:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for r in points:
            ax.scatter(100 * r["following_rate"], 100 * r["mean_crr"], s=40)
            ax.annotate(plain(f"{r['method']} ({r['concept']})"), (100 * r["following_rate"], 100 * r["mean_crr"]),
                        fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("non-target prompt following (%)  (higher is better)")
        ax.set_ylabel("mean CRR over scenarios (%)  (lower is better)")
        ax.set_xlim(-2, 105)
        ax.set_ylim(-2, 105)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        _save(fig, out / "report" / "crr_vs_preservation.png")
        plt.close(fig)
        written["crr_vs_preservation"] = "report/crr_vs_preservation.png"
    return written


def write_grids(out: Path, summary: dict, rows: list[dict], per_cell: int = 16) -> dict[str, str]:
    """One grid PNG per cell (its first ``per_cell`` images): ``report/grids/<cell folder>.png``, by cell id."""
    from erasekit.bench.cells import Cell
    from erasekit.image_store import write_grid

    by_cell: dict[tuple, list[dict]] = {}
    for r in rows:
        by_cell.setdefault((r["concept"], r["method"], r["scenario"]), []).append(r)
    (out / "report" / "grids").mkdir(parents=True, exist_ok=True)
    written = {}
    for (concept, method, scenario), cell_rows in by_cell.items():
        cell = Cell(concept, method, scenario)
        cell_rows = sorted(cell_rows, key=lambda r: r["index"])[:per_cell]
        shown = [{"path": r["path"], "prompt": ""} for r in cell_rows if (out / r["path"]).is_file()]
        if not shown:
            continue
        name = f"report/grids/{cell.folder}.png"
        write_grid(out, shown, columns=min(8, len(shown)), name=name)
        written[cell.id] = name
    return written

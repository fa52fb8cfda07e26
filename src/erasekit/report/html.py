"""report.html: one self-contained page (images by relative path), rendered by Jinja2 with autoescape on."""

from __future__ import annotations

from pathlib import Path

from erasekit.report.format import crr_cell, crr_colour, invalid_note, num, pct, preservation_rows
from erasekit.report.quality import quality_table


def environment():
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("erasekit.report", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters.update(crr_cell=crr_cell, crr_colour=crr_colour, num=num)
    return env


def render_html(summary: dict, plots: dict[str, str], grids: dict[str, str], rows: list[dict] = ()) -> str:
    from erasekit.bench.cells import PRESERVATION

    prompts: dict[str, list[str]] = {}
    for r in rows:
        seen = prompts.setdefault(f"{r['concept']}/{r['method']}/{r['scenario']}", [])
        if r.get("prompt") is not None and r["prompt"] not in seen and len(seen) < 3:
            seen.append(r["prompt"] or "(empty prompt)")

    cell_grids = []
    for concept in summary["concepts"]:
        for method in summary["methods"]:
            for scenario in [*summary["scenarios"], PRESERVATION]:
                cid = f"{concept}/{method}/{scenario}"
                if cid in grids:
                    s = summary["tables"]["crr"].get(concept, {}).get(method, {}).get(scenario)
                    cell_grids.append({"id": cid, "path": grids[cid], "crr": s, "prompts": prompts.get(cid, [])})
    return environment().get_template("report.html.j2").render(
        s=summary, cfg=summary["config"], prov=summary.get("provenance", {}), plots=plots, cell_grids=cell_grids,
        preservation=preservation_rows(summary), costs=summary["tables"]["costs"], invalid_note=invalid_note(summary),
        quality=quality_table(summary), harmonic=harmonic_rows(summary))


def harmonic_rows(summary: dict) -> list[dict]:
    """The mass-erasure table (groups of concepts erased at once), one row per group, method and scenario."""
    return [{"group": group, "members": len(e["members"]), "method": method, "scenario": scenario,
             "erased": pct(e["erased_rate"]), "retained": pct(e["retained_rate"]), "h_o": num(e["H_o"], 3)}
            for group, by_m in (summary["tables"].get("harmonic") or {}).items()
            for method, by_s in by_m.items() for scenario, e in by_s.items()]


def write_html(out: Path, summary: dict, plots: dict[str, str], grids: dict[str, str], rows: list[dict] = ()) -> Path:
    from erasekit.atomic import atomic_write_text

    path = out / "report.html"
    atomic_write_text(path, render_html(summary, plots, grids, rows))
    return path

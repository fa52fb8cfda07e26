"""report.md: the M-ErasureBench table, preservation and costs as Markdown."""

from __future__ import annotations

from pathlib import Path

from erasekit.report.format import crr_cell, invalid_note, num, pct, preservation_rows
from erasekit.report.quality import quality_markdown


def crr_markdown(summary: dict) -> str:
    """Methods x scenarios per concept: CRR [Wilson 95% interval]."""
    scenarios = summary["scenarios"]
    lines = []
    for concept in summary["concepts"]:
        lines.append(f"| {concept}: method | " + " | ".join(scenarios) + " |")
        lines.append("|---" * (len(scenarios) + 1) + "|")
        for method in summary["methods"]:
            cells = summary["tables"]["crr"].get(concept, {}).get(method, {})
            lines.append(f"| {_md(method)} | " + " | ".join(crr_cell(cells.get(s)) for s in scenarios) + " |")
        lines.append("")
    return "\n".join(lines)


def preservation_markdown(summary: dict) -> str:
    lines = ["| concept | method | non-target prompt following [95% CI] | relative to original | drawn as the concept "
             "| Fréchet distance (detector features) |", "|---|---|---|---|---|---|"]
    for r in preservation_rows(summary):
        lines.append(f"| {_md(r['concept'])} | {_md(r['method'])} | {r['following']} | {r['relative']} | "
                     f"{r['drawn_as_concept']} | {r['fd']} |")
    return "\n".join(lines) + "\n"


def harmonic_markdown(summary: dict) -> str:
    """Mass erasure (#24): per group, method and scenario, the erased and retained rates and H_o; "" when none."""
    table = summary["tables"].get("harmonic") or {}
    if not table:
        return ""
    lines = ["| group | method | scenario | erased still drawn | retained drawn | H_o |", "|---|---|---|---|---|---|"]
    for group, by_m in table.items():
        for method, by_s in by_m.items():
            for scenario, e in by_s.items():
                lines.append(f"| {_md(group)} ({len(e['members'])}) | {_md(method)} | {_md(scenario)} | "
                             f"{pct(e['erased_rate'])} | {pct(e['retained_rate'])} | {num(e['H_o'], 3)} |")
    return "\n".join(lines) + "\n"


def cost_markdown(summary: dict) -> str:
    costs = summary["tables"]["costs"]
    lines = ["| stage | wall s | CPU s | peak RSS MB | CUDA peak MB | images | UNet evaluations |",
             "|---|---|---|---|---|---|---|"]
    for stage, c in costs["stages"].items():
        lines.append(f"| {stage} | {num(c['wall_s'])} | {num(c['cpu_s'])} | {num(c['peak_rss_mb'], 0)} | "
                     f"{num(c['cuda_peak_mb'], 0)} | {num(c['images'])} | {num(c['unet_evals'])} |")
    lines.append(f"\n{costs['runs']} run(s) into this folder; total wall {num(costs['total_wall_s'])} s.\n")
    return "\n".join(lines)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def write_markdown(out: Path, summary: dict, plots: dict[str, str]) -> Path:
    from erasekit.atomic import atomic_write_text

    prov = summary.get("provenance", {})
    cfg = summary["config"]
    parts = [
        "# erasekit bench report", "",
        f"model `{_md(cfg['model'])}`, {cfg['images_per_cell']} images per cell, seed {cfg['seed']}, "
        f"detector {_md(cfg['detector'].get('name') or 'the world default')}; erasekit {prov.get('erasekit')}, "
        f"commit {prov.get('git_commit')}; config key {summary['config_key']}.", "",
        *([f"**{invalid_note(summary)}**", ""] if invalid_note(summary) else []),
        "## Concept reproduction rate (CRR, Wilson 95% interval)", "", crr_markdown(summary),
        "## Preservation", "", preservation_markdown(summary),
        *(["## Image quality", "", quality_markdown(summary, _md)] if quality_markdown(summary) else []),
        *(["## Mass erasure (H_o: harmonic mean of 1 - erased rate and retained rate)", "",
           harmonic_markdown(summary)] if harmonic_markdown(summary) else []),
        "## Cost per stage", "", cost_markdown(summary),
    ]
    for name, path in plots.items():
        parts += [f"![{name}]({path})", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path

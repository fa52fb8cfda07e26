"""Shared formatting of table cells (Markdown and HTML)."""

from __future__ import annotations


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def crr_cell(s: dict | None) -> str:
    """``5% [2-11]`` (CRR and its Wilson 95% interval, in percent) or ``-``; with ``, 3 invalid`` when degenerate
    images were left out (all of them invalid: ``- (20 invalid)``, never 0%)."""
    invalid = (s or {}).get("invalid") or 0
    note = f" ({invalid} invalid)" if invalid else ""
    if not s or s.get("crr") is None:
        return "-" + note
    low, high = s["ci"]
    return f"{100 * s['crr']:.0f}% [{100 * low:.0f}-{100 * high:.0f}]" + note


def invalid_note(summary: dict) -> str:
    """A sentence on degenerate images, or "" when there are none."""
    n = summary.get("invalid_images") or 0
    if not n:
        return ""
    return (f"Warning: {n} of {summary.get('images', '?')} images are invalid (degenerate: a constant image, what "
            f"NaN latents decode to). They are left out of every rate and counted as 'invalid' in each cell: a "
            f"broken model or sampler setting, not an erased concept.")


def crr_colour(s: dict | None) -> str:
    """A background colour from green (0% reproduced) through yellow to red (100%)."""
    if not s or s.get("crr") is None:
        return "#eeeeee"
    x = max(0.0, min(1.0, float(s["crr"])))
    r = int(255 if x > 0.5 else 120 + 270 * x)
    g = int(200 if x < 0.5 else 200 - 330 * (x - 0.5))
    return f"#{min(r, 255):02x}{max(g, 60):02x}90"


def num(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.{digits}f}"


def preservation_rows(summary: dict) -> list[dict]:
    """One row per (concept, method): CRR mean over scenarios, prompt following, relative, drawn as concept, FD."""
    out = []
    crr = summary["tables"]["crr"]
    pres = summary["tables"].get("preservation", {})
    for concept in summary["concepts"]:
        for method in summary["methods"]:
            cells = crr.get(concept, {}).get(method, {})
            values = [s["crr"] for s in cells.values() if s.get("crr") is not None]
            p = pres.get(concept, {}).get(method)
            out.append({
                "concept": concept, "method": method,
                "mean_crr": sum(values) / len(values) if values else None,
                "following": crr_cell(p["following"]) if p and p.get("following") else "-",
                "following_rate": p["following"]["crr"] if p and p.get("following") else None,
                "relative": pct(p["relative"]) if p and p.get("relative") is not None else "-",
                "drawn_as_concept": crr_cell(p["drawn_as_concept"]) if p else "-",
                "fd": num(p.get("fd"), 2) if p else "-",
            })
    return out

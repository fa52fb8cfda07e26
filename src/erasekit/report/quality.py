"""The bench's image-quality table (`erasekit.bench.quality`): CLIP score, FD and KID per method, and the judges
(model folder, fingerprint) and reference behind them; one table for report.md and report.html."""

from __future__ import annotations


def quality_table(summary: dict) -> dict | None:
    """{head, rows (cells as text), reference (a sentence), judges [(name, model, fingerprint)]}; None when the
    config asked for no quality metrics. Names are raw: each format escapes them its own way."""
    q = (summary.get("tables") or {}).get("quality") or {}
    if not q.get("table"):
        return None
    kinds = [k[3:] for k in q.get("judges", {}) if k.startswith("fd_")]
    has_clip = "clip_score" in q.get("judges", {})
    has_kid = any(f"kid_{k}" in e for by_m in q["table"].values() for e in by_m.values() for k in kinds)
    head = ["concept", "method", "images"] + (["CLIP score"] if has_clip else []) + \
        [f"FD ({k})" for k in kinds] + ([f"KID ({k})" for k in kinds] if has_kid else [])
    rows = []
    for concept, by_m in q["table"].items():
        for method, e in by_m.items():
            cells = [str(concept), str(method), str(e.get("n", "-"))]
            if has_clip:
                cs = e.get("clip_score")
                cells.append(f"{cs['mean']:.2f} ± {cs['std']:.2f}" if cs else "-")
            for k in kinds:
                v = e.get(f"fd_{k}")
                cells.append("-" if v is None else f"{v:.4g}")
            if has_kid:
                for k in kinds:
                    v = e.get(f"kid_{k}")
                    cells.append("-" if not v else f"{v['mean']:.4g} ± {v['std']:.2g}")
            rows.append(cells)
    ref = q.get("reference")
    reference = ("the original model's images for the same prompts and seeds" if ref == "original"
                 else f"the images in {ref}")
    judges = [(str(name), str(info.get("model")), str(info.get("model_fingerprint")))
              for name, info in q.get("judges", {}).items()]
    return {"head": head, "rows": rows, "reference": reference, "judges": judges}


def quality_markdown(summary: dict, md=lambda s: str(s)) -> str:
    """'' when the config asked for no quality metrics."""
    t = quality_table(summary)
    if t is None:
        return ""
    lines = ["| " + " | ".join(t["head"]) + " |", "|---" * len(t["head"]) + "|"]
    for cells in t["rows"]:
        lines.append("| " + " | ".join([md(cells[0]), md(cells[1]), *cells[2:]]) + " |")
    ref = summary["tables"]["quality"].get("reference")
    lines += ["", "Reference: " + ("the original model's images for the same prompts and seeds" if ref == "original"
                                   else f"the images in `{md(ref)}`") + "."]
    for name, model, fp in t["judges"]:
        lines.append(f"- {md(name)}: `{md(model)}` (fingerprint {md(fp)})")
    return "\n".join(lines) + "\n"

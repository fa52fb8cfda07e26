"""From ``results.jsonl`` (one row per image) to the tables of ``summary.json``, and the report files.

Tables:

- ``crr[concept][method][scenario]``: concept reproduction rate, Wilson 95% interval, n, k (the M-ErasureBench table);
- ``preservation[concept][method]``: non-target prompt following (share of the world's other-concept prompts whose
  concept is present by the detector's rule), the same relative to the original model, the share drawn as the erased
  concept, and the Fréchet distance between the detector's penultimate features of the method's images and the
  original model's for the same prompts and seeds (torchmetrics' FrechetInceptionDistance with the embedded
  world's detector as its feature extractor: no Inception weights, no torchvision);
- ``costs``: per stage, summed over every run into the folder (wall, CPU, peak memory, images, UNet evaluations).

Degenerate images (rows with ``valid: false``: a constant image, what NaN latents decode to) are in no rate:
every CRR and prompt-following entry is over the valid images and carries ``invalid``, their count (#18).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from erasekit.bench.cells import PRESERVATION, REFERENCE
from erasekit.bench.spec import BenchConfig, to_dict

STAGES = ("edits", "attacks", "generation", "scoring", "quality", "report")


def _crr(flags, invalid: int = 0) -> dict:
    from erasekit.metrics import crr_summary

    s = crr_summary(flags, invalid=invalid)
    return {"crr": s["crr"], "ci": s["ci"], "n": s["n"], "k": s["k"], "invalid": s["invalid"]}


def _rows_crr(rows, field: str = "present") -> dict:
    """CRR over the valid rows, the invalid (degenerate) ones counted apart (`erasekit.metrics.crr.valid_flags`)."""
    from erasekit.metrics.crr import valid_flags

    flags, invalid = valid_flags(rows, field)
    return _crr(flags, invalid)


def frechet_distance(real: np.ndarray, fake: np.ndarray, features) -> float | None:
    """Fréchet distance of two uint8 (N, H, W, 3) image sets on ``features`` (the world's detector features,
    `World.frechet_features`; None for < 2 images)."""
    if len(real) < 2 or len(fake) < 2:
        return None
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    # sync_on_compute off: under `accelerate launch` only the main process computes it (no collective to join).
    fid = FrechetInceptionDistance(feature=features, normalize=True, input_img_size=(3, *real.shape[1:3]),
                                   sync_on_compute=False)
    with torch.inference_mode():
        for arr, is_real in ((real, True), (fake, False)):
            x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0
            fid.update(x, real=is_real)
        value = float(fid.compute())
    return round(max(value, 0.0), 4)


def _images(out: Path, rows: list[dict]) -> np.ndarray:
    from PIL import Image

    arrays = []
    for r in rows:
        with Image.open(out / r["path"]) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    return np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8)


def crr_table(rows: list[dict]) -> dict:
    cells: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        if r["kind"] == "attack":
            cells[r["concept"]][r["method"]][r["scenario"]].append(r)
    return {c: {m: {s: _rows_crr(f) for s, f in by_s.items()} for m, by_s in by_m.items()} for c, by_m in cells.items()}


def preservation_table(rows: list[dict], out: Path | None, features=None) -> dict:
    """Prompt following of the other concepts per method; with ``features`` (the world's detector features) also
    the Fréchet distance to the original model's images."""
    by: dict = defaultdict(lambda: defaultdict(list))
    ref: dict = defaultdict(list)
    for r in rows:
        if r["kind"] == PRESERVATION:
            by[r["concept"]][r["method"]].append(r)
        elif r["kind"] == REFERENCE:
            ref[r["concept"]].append(r)
    table = {}
    for concept, by_m in by.items():
        ref_rows = sorted(ref.get(concept, []), key=lambda r: r["index"])
        ref_follow = [r["label_present"] for r in ref_rows if r.get("label_present") is not None
                      and r.get("valid", True)]
        base = sum(ref_follow) / len(ref_follow) if ref_follow else None
        ref_images = _images(out, ref_rows) if features is not None and out is not None and ref_rows else None
        table[concept] = {}
        for method, mrows in by_m.items():
            mrows = sorted(mrows, key=lambda r: r["index"])
            follow = [r["label_present"] for r in mrows if r.get("label_present") is not None
                      and r.get("valid", True)]
            invalid = sum(r.get("valid", True) is False for r in mrows)
            entry = {
                "following": _crr(follow, invalid) if follow or invalid else None,
                "relative": (round((sum(follow) / len(follow)) / base, 4) if follow and base else None),
                "drawn_as_concept": _rows_crr(mrows),
                "fd": None,
                "n": len(mrows),
                "invalid": invalid,
            }
            if ref_images is not None and len(mrows):
                entry["fd"] = frechet_distance(ref_images, _images(out, mrows), features)
            table[concept][method] = entry
    return table


def cost_table(cost_rows: list[dict]) -> dict:
    """Per stage: sums over every run (wall, CPU, images, UNet evaluations) and the largest peak memory."""
    table: dict = {}
    runs = []
    for r in cost_rows:
        if r.get("run") not in runs:
            runs.append(r.get("run"))
        t = table.setdefault(r["stage"], {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mb": None, "cuda_peak_mb": None,
                                          "images": 0, "unet_evals": 0, "runs": 0})
        t["runs"] += 1
        if r.get("processes"):  # generation over several processes: every process's work counts
            t["wall_s"] += max(p.get("wall_s") or 0 for p in r["processes"])
            t["cpu_s"] += sum(p.get("cpu_s") or 0 for p in r["processes"])
            t["unet_evals"] += sum(p.get("unet_evals") or 0 for p in r["processes"])
            t["images"] += sum(p.get("images") or 0 for p in r["processes"])
            peaks = [p.get("peak_rss_mb") for p in r["processes"] if p.get("peak_rss_mb") is not None]
            cpeaks = [p.get("cuda_peak_mb") for p in r["processes"] if p.get("cuda_peak_mb") is not None]
        else:
            t["wall_s"] += r.get("wall_s") or 0
            t["cpu_s"] += r.get("cpu_s") or 0
            t["unet_evals"] += r.get("unet_evals") or 0
            t["images"] += r.get("images") or 0
            peaks = [r["peak_rss_mb"]] if r.get("peak_rss_mb") is not None else []
            cpeaks = [r["cuda_peak_mb"]] if r.get("cuda_peak_mb") is not None else []
        for key, values in (("peak_rss_mb", peaks), ("cuda_peak_mb", cpeaks)):
            if values:
                t[key] = max([v for v in (t[key], *values) if v is not None])
    ordered = {s: table[s] for s in STAGES if s in table}
    ordered.update({s: v for s, v in table.items() if s not in ordered})
    for t in ordered.values():
        t["wall_s"], t["cpu_s"] = round(t["wall_s"], 2), round(t["cpu_s"], 2)
    return {"stages": ordered, "runs": len(runs),
            "total_wall_s": round(sum(t["wall_s"] for t in ordered.values()), 2)}


def _generation_choices(cost_rows: list[dict], run_id: str) -> dict:
    """How this run generated: fast or eager and why (``fast: auto``), the batching, its compilation."""
    gen = [r for r in cost_rows if r.get("stage") == "generation" and r.get("run") == run_id]
    if not gen:
        return {}
    return {k: gen[-1][k] for k in ("fast", "batching", "compile") if gen[-1].get(k) is not None}


def build_summary(cfg: BenchConfig, rows: list[dict], cost_rows: list[dict], cell_info: dict, edit_info: dict,
                  key: str, run_id: str, processes: int, out: Path) -> dict:
    from erasekit.bench.groups import harmonic_table
    from erasekit.bench.spec import member_names
    from erasekit.bench.quality import read_quality, world_features
    from erasekit.provenance import provenance

    methods = [m.name for m in cfg.methods]
    crr = crr_table(rows)
    return {
        "config_key": key,
        "config": to_dict(cfg),
        "provenance": provenance(),
        "last_run": {"id": run_id, "processes": processes, **_generation_choices(cost_rows, run_id)},
        "methods": methods,
        "scenarios": list(cfg.scenarios),
        "concepts": member_names(cfg),  # a group's erased concepts in its place (`erasekit.bench.groups`)
        "images": len(rows),
        "invalid_images": sum(r.get("valid", True) is False for r in rows),  # degenerate: in no rate (#18)
        # The detector-feature FD belongs to the embedded world; elsewhere the quality section's judges (#21).
        "tables": {"crr": crr, "preservation": preservation_table(rows, out, features=world_features(out, cfg)),
                   "quality": read_quality(out), "costs": cost_table(cost_rows),
                   # H_o of each group that erases several concepts at once (#24)
                   "harmonic": harmonic_table(cfg, crr, preservation_table(rows, None))},
        "cells": cell_info,
        "edits": {f"{c}/{m}": v for (c, m), v in edit_info.items()} if edit_info and isinstance(
            next(iter(edit_info)), tuple) else edit_info,
    }


def write_outputs(out: Path, summary: dict, rows: list[dict]) -> None:
    """summary.json, report.md and report.html (with its plots and grids) into ``out``."""
    from erasekit.atomic import atomic_write_text
    from erasekit.report import write_report

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    write_report(out, summary, rows)


ROW_KINDS = ("attack", PRESERVATION, REFERENCE)


def check_row(r: dict, out: Path, where: str) -> None:
    """`ErasekitError` unless results row ``r`` has what the tables read, and its ``path`` names a file inside
    ``out`` (a row pointing at /somewhere/else.png would have that file read and drawn into the report)."""
    from erasekit.errors import ErasekitError
    from erasekit.paths import inside

    for key in ("row", "concept", "method", "scenario", "kind", "path"):
        if not isinstance(r.get(key), str):
            raise ErasekitError(f"{where}: no {key!r} (text) in the row; this is not a results row of erasekit bench")
    if r["kind"] not in ROW_KINDS:
        raise ErasekitError(f"{where}: unknown kind {r['kind'][:40]!r} (expected {', '.join(ROW_KINDS)})")
    if not isinstance(r.get("present"), bool) or isinstance(r.get("index"), bool) or not isinstance(r.get("index"), int):
        raise ErasekitError(f"{where}: 'present' must be true/false and 'index' an integer")
    if not inside(out, r["path"]):
        raise ErasekitError(f"{where}: path {r['path'][:80]!r} is outside the results folder; refusing to read it")


def rebuild(out) -> dict:
    """Rebuild summary.json and the report of a results folder from its files (``erasekit report DIR``)."""
    from erasekit.bench.layout import CONFIG_FILE, COSTS_FILE, RESULTS_FILE, SUMMARY_FILE
    from erasekit.bench.spec import parse_config
    from erasekit.errors import ErasekitError
    from erasekit.jsonl import read_jsonl

    out = Path(out)
    if not out.is_dir():
        raise ErasekitError(f"{out}: no such folder")
    meta = out / CONFIG_FILE
    if not meta.is_file() or not (out / RESULTS_FILE).is_file():
        raise ErasekitError(f"{out} is not a bench results folder (needs {CONFIG_FILE} and {RESULTS_FILE})")
    try:
        saved = json.loads(meta.read_text(encoding="utf-8"))
        cfg = parse_config(saved["config"], str(meta))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ErasekitError(f"{meta}: unreadable ({type(exc).__name__})") from None
    old = {}
    if (out / SUMMARY_FILE).is_file():
        try:
            old = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
    by_id = {}
    for number, r in enumerate(read_jsonl(out / RESULTS_FILE), 1):
        if isinstance(r, dict) and "row" in r:
            check_row(r, out, f"{out / RESULTS_FILE}, record {number}")
            by_id[r["row"]] = r
    rows = list(by_id.values())
    summary = build_summary(cfg, rows, read_jsonl(out / COSTS_FILE), old.get("cells", {}), old.get("edits", {}),
                            saved.get("config_key", ""), (old.get("last_run") or {}).get("id", ""),
                            (old.get("last_run") or {}).get("processes", 1), out)
    write_outputs(out, summary, rows)
    return summary

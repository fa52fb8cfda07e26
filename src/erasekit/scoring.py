"""Scoring generated images with a detector: the fields every score row carries, and the resumable scoring of a
store's records into ``scores.jsonl`` (``erasekit attack``). The benchmark scores its cells with the same fields
(`erasekit.bench.stages.score_jobs`, one row per cell image in ``results.jsonl``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SCORES_FILE = "scores.jsonl"


def detector_id(info: dict) -> str:
    """The key of a detector's scores: a hash of its ``info()`` (name, preset, threshold, model, settings)."""
    from erasekit.store import content_key

    return content_key(info)


def score_fields(score: dict, info: dict, det_id: str, problem: str | None) -> dict:
    """What a row records of one image's score: the detector's output, who scored it, and whether the image is
    valid (a degenerate image is flagged, never read as "concept absent", #18)."""
    from erasekit.detectors import judge_fields
    from erasekit.validity import validity_fields

    return {**score, "present": bool(score["present"]), "detector": info["name"], "preset": info.get("preset"),
            "threshold": info["threshold"], "detector_id": det_id, **validity_fields(problem), **judge_fields(info)}


def score_records(detector, out_dir: Path, records: list[dict], batch_size: int = 256) -> list[dict]:
    """One score row per record (reusing rows already in ``scores.jsonl`` for the same image and detector)."""
    from erasekit.atomic import atomic_write_text
    from erasekit.image_store import load_images
    from erasekit.jsonl import read_jsonl
    from erasekit.validity import image_problem

    info = detector.info()
    det_id = detector_id(info)
    path = Path(out_dir) / SCORES_FILE
    # Rows of an older erasekit carry no validity: scored again (#18: a degenerate image is flagged, not "absent").
    cached = {row["key"]: row for row in read_jsonl(path)
              if row.get("detector_id") == det_id and "key" in row and "valid" in row}
    missing = [r for r in records if r["key"] not in cached]
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        images = load_images(out_dir, chunk)
        scores = detector.score(np.stack(images))
        for rec, s, image in zip(chunk, scores, images):
            problem = rec.get("invalid") if rec.get("valid") is False else image_problem(image)
            cached[rec["key"]] = {
                "key": rec["key"], "path": rec["path"], "prompt": rec.get("prompt"), "seed": rec.get("seed"),
                "guidance": rec.get("guidance"), **{k: rec[k] for k in ("source", "case_number") if k in rec},
                **score_fields(s, info, det_id, problem),
            }
    rows = [cached[r["key"]] for r in records]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return rows

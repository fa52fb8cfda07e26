"""The bench's ``quality:`` section: what an erasure costs in image quality, with judges the config names.

Computed on every method's preservation images (per concept: the world's other-concept prompts, or a COCO-captions
CSV given as ``quality.prompts``, with its rows' seeds):

- ``clip_score``: a CLIP model folder; the CLIP score of each image against its prompt (mean, clipped at 0);
- ``fd``: a list of feature extractors (``{features: dinov2, model: FOLDER}`` is FD_DINOv2; ``clip``; ``toy``, the
  embedded world's detector, on its models only); the Fréchet distance of the method's images to the reference;
- ``kid``: the kernel distance on the same features;
- ``reference``: ``original`` (the original model's images for the same prompts and seeds) or a folder of images
  (e.g. COCO val; with the CSV's ``image_id`` column, the images of the prompts used).

The feature extractor is always the config's (or, with no ``quality:`` section, the embedded world's detector on
the embedded world, as the preservation table's ``fd`` always was); on Stable Diffusion nothing is computed unless
asked. Results go to ``quality.json`` (the report reads it back); each names its judge, model and fingerprint.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from erasekit.errors import ErasekitError

QUALITY_FILE = "quality.json"
REFERENCE_LABEL = "original (reference)"  # the original model's images of the same prompts and seeds


def validate_quality(cfg) -> None:
    """Config checks that need no model."""
    from erasekit.checks import integer
    from erasekit.metrics.features import EXTRACTORS

    q = cfg.quality
    kinds = [f.features for f in q.fd]
    for i, f in enumerate(q.fd):
        if f.features not in EXTRACTORS:
            raise ErasekitError(f"config: quality.fd[{i}].features must be one of {', '.join(EXTRACTORS)}, got "
                                f"{f.features!r}")
        if f.features == "toy" and f.model:
            raise ErasekitError(f"config: quality.fd[{i}]: the toy features are the embedded world's detector (no model)")
    if len(set(kinds)) != len(kinds):
        raise ErasekitError("config: quality.fd lists a feature extractor twice")
    if q.kid and not q.fd:
        raise ErasekitError("config: quality.kid needs quality.fd (KID uses the same feature extractors)")
    if q.reference != "original" and not Path(q.reference).is_dir():
        raise ErasekitError(f"config: quality.reference must be 'original' or a folder of images; {q.reference}: no "
                            f"such folder")
    if q.prompts is not None:
        from erasekit.metrics.coco import load_prompt_csv

        load_prompt_csv(q.prompts)
        if not cfg.preservation.enabled:
            raise ErasekitError("config: quality.prompts needs preservation enabled (its images are the quality images)")
    integer("config: quality.kid_subsets", q.kid_subsets, low=1, high=10_000)
    integer("config: quality.kid_subset_size", q.kid_subset_size, low=2, high=1_000_000)
    integer("config: quality.batch_size", q.batch_size, low=1, high=4096)
    if (q.clip_score or q.fd) and not cfg.preservation.enabled:
        raise ErasekitError("config: quality metrics are computed on preservation images: enable preservation")


def enabled(cfg) -> bool:
    q = cfg.quality
    return bool(q.clip_score or q.fd)


def prompt_rows(cfg) -> list[dict] | None:
    """The quality CSV's rows (prompt, seed, image_id), or None when the world's preservation prompts are used."""
    if cfg.quality.prompts is None:
        return None
    from erasekit.metrics.coco import load_prompt_csv

    return load_prompt_csv(cfg.quality.prompts)


def _load(out: Path, rows: list[dict]) -> np.ndarray:
    from PIL import Image

    arrays = []
    for r in rows:
        with Image.open(out / r["path"]) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    return np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8)


def compute_quality(cfg, world_name: str, rows: list[dict], out: Path) -> dict:
    """The quality table for ``rows`` (results.jsonl rows of this plan), written to ``out/quality.json``."""
    from erasekit.atomic import atomic_write_text
    from erasekit.bench.cells import PRESERVATION, REFERENCE

    q = cfg.quality
    device = q.device if q.device != "auto" else cfg.device  # by default the device that generated the images
    record: dict = {"world": world_name, "reference": q.reference, "judges": {}, "table": {}}
    if not enabled(cfg):
        atomic_write_text(out / QUALITY_FILE, json.dumps(record, indent=2) + "\n")
        return record
    if any(f.features == "toy" for f in q.fd) and world_name != "toy":
        raise ErasekitError("config: quality.fd 'toy' features are the embedded world's detector; on this model use "
                            "dinov2 or clip with a model folder")
    by: dict = defaultdict(lambda: defaultdict(list))
    ref_rows: dict = defaultdict(list)
    for r in rows:
        if r["kind"] == PRESERVATION:
            by[r["concept"]][r["method"]].append(r)
        elif r["kind"] == REFERENCE:
            ref_rows[r["concept"]].append(r)
    scorer = None
    if q.clip_score:
        from erasekit.metrics.clip_score import ClipScorer

        scorer = ClipScorer(q.clip_score, device=device, batch_size=q.batch_size)
        record["judges"]["clip_score"] = scorer.info()
    from erasekit.metrics.features import feature_extractor

    extractors = {f.features: feature_extractor(f.features, f.model, device=device, batch_size=q.batch_size)
                  for f in q.fd}
    for kind, ext in extractors.items():
        record["judges"][f"fd_{kind}"] = ext.info()
    folder_feats: dict = {}
    for concept, by_m in by.items():
        refs = sorted(ref_rows.get(concept, []), key=lambda r: r["index"])
        ref_images = None
        if q.reference == "original":
            ref_images = _load(out, refs) if refs else None
        table = record["table"][concept] = {}
        groups = {m: sorted(mr, key=lambda r: r["index"]) for m, mr in by_m.items()}
        if refs:
            groups = {REFERENCE_LABEL: refs, **groups}
        for method, mrows in groups.items():
            images = _load(out, mrows)
            entry: dict = {"n": len(mrows)}
            if scorer is not None:
                from erasekit.metrics.clip_score import summarize

                entry["clip_score"] = summarize(scorer.scores(images, [r["prompt"] for r in mrows]))
            for kind, ext in extractors.items():
                if method == REFERENCE_LABEL and q.reference == "original":
                    continue  # the reference itself
                feats = ext.extract(images)
                if q.reference == "original":
                    ref = ext.extract(ref_images) if ref_images is not None and len(ref_images) else None
                else:
                    key = (kind, tuple(r.get("image_id") or "" for r in mrows), images.shape[1])
                    if key not in folder_feats:
                        folder_feats[key] = ext.extract(_reference_folder(q.reference, mrows, images.shape[1]))
                    ref = folder_feats[key]
                entry.update(_distances(kind, feats, ref, q))
            table[method] = entry
    atomic_write_text(out / QUALITY_FILE, json.dumps(record, indent=2, default=str) + "\n")
    return record


def _reference_folder(folder: str, rows: list[dict], size: int) -> np.ndarray:
    from erasekit.metrics.coco import reference_images

    ids = [r.get("image_id") for r in rows]
    arr, _ = reference_images(folder, size=size, ids=ids if all(ids) else None)
    return arr


def _distances(kind: str, feats: np.ndarray, ref, q) -> dict:
    from erasekit.metrics.frechet import frechet_distance, kernel_distance

    if ref is None:
        return {f"fd_{kind}": None}
    fd = frechet_distance(ref, feats)
    out = {f"fd_{kind}": round(fd, 4) if fd is not None else None, "n_reference": int(len(ref))}
    if q.kid:
        out[f"kid_{kind}"] = kernel_distance(ref, feats, q.kid_subsets, q.kid_subset_size)
    return out


def read_quality(out: Path | None) -> dict | None:
    if out is None or not (Path(out) / QUALITY_FILE).is_file():
        return None
    try:
        return json.loads((Path(out) / QUALITY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def world_features(out: Path | None, cfg):
    """The features of the preservation table's detector-feature FD: the world's own (`World.frechet_features`),
    for the world the run was made on (recorded in quality.json, else named by the config); None when it has none."""
    from erasekit.worlds import world_named

    saved = read_quality(out)
    world = world_named(saved.get("world") if saved is not None else cfg.model)
    return world.frechet_features() if world is not None else None

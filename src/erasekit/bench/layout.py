"""A bench results folder: its file names, where its images live, and whether it can take a config's results.

    config.json      the config (and its key) the folder's results belong to, with provenance
    results.jsonl    one row per cell image (appended; the last row of an id wins)
    costs.jsonl      one row per finished stage of every run
    summary.json     the tables; report.md, report.html and report/ (plots, grids) beside it
    images/          the image store (`erasekit.image_store`): ``images/<key[:2]>/<key>.png`` and its index
    cache/           edits (``cache/edits/``), learned tokens and inverted latents, by content key
"""

from __future__ import annotations

import json
from pathlib import Path

from erasekit.errors import ErasekitError
from erasekit.store import content_key

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
COSTS_FILE = "costs.jsonl"
SUMMARY_FILE = "summary.json"
IMAGES_DIR = "images"
CACHE_DIR = "cache"


def image_path(key: str) -> str:
    """Where an image lives, relative to the results folder."""
    from erasekit.image_store import keyed_filename

    return f"{IMAGES_DIR}/{keyed_filename(key)}"


def config_key(cfg) -> str:
    return content_key("bench-config", cfg.identity())


def check_out(out: Path, cfg) -> bool:
    """Whether ``out`` already holds this config's results (resume); ErasekitError when it cannot take them."""
    if out.exists() and not out.is_dir():
        raise ErasekitError(f"--out {out} exists and is not a folder")
    if not out.exists():
        return False
    meta = out / CONFIG_FILE
    if not meta.is_file():
        visible = [p for p in out.iterdir() if not p.name.startswith(".")]
        if visible:
            raise ErasekitError(f"--out {out} is not empty and holds no bench results ({CONFIG_FILE}); use a new folder")
        return False
    try:
        saved = json.loads(meta.read_text(encoding="utf-8"))
        saved_key = saved["config_key"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ErasekitError(f"--out {out}: {meta} is unreadable; use a new folder") from None
    if saved_key != config_key(cfg):
        raise ErasekitError(f"--out {out} holds results of another bench config (key {saved_key}, this one "
                            f"{config_key(cfg)}); use a new folder, or the config saved in {meta}")
    return True


def write_config(out: Path, cfg) -> None:
    from erasekit.atomic import atomic_write_text
    from erasekit.bench.spec import to_dict
    from erasekit.provenance import provenance

    meta = out / CONFIG_FILE
    if meta.is_file():
        return  # check_out, under the same lock, found this config's key in it
    record = {"config_key": config_key(cfg), "config": to_dict(cfg), "provenance": provenance()}
    atomic_write_text(meta, json.dumps(record, indent=2) + "\n")

"""The content-keyed cache: costly intermediate results (learned embeddings, inverted latents) are stored under a
key hashed from everything that determines them, so a rerun, a larger run or another scenario reuses them and a
change of any input computes them anew. Files are written whole or not at all (`erasekit.atomic`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from erasekit.atomic import atomic_save_safetensors, atomic_write_text


def content_key(*parts, n_chars: int = 16) -> str:
    """A short hash of JSON-able ``parts`` (dict keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:n_chars]


def write_safetensors_atomic(path: Path, tensors: dict, record: dict | None = None) -> Path:
    """``path`` (safetensors) and, with ``record``, ``path.with_suffix('.json')`` beside it, each atomically;
    the JSON last, so that its presence means both are complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path)
    if record is not None:
        atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=2, default=str) + "\n")
    return path

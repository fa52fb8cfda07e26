"""Cache or compute: costly intermediate results (learned tokens, inverted latents, adversarial prompts, a probe's
record) stored under a cache folder by `erasekit.store.content_key` of everything that determines them.

    value, reused = cached(ctx.cache_dir, "unlearndiffatk", (key,), compute)

reads ``<cache_dir>/unlearndiffatk-<content_key(key)>.json`` when it is there (``reused``: its path), else calls
``compute()`` and writes its result there (``reused``: None). Without a cache folder it always computes. ``save``
and ``load`` change the format (safetensors, a folder of files); ``complete`` says which files make an entry whole
(the one written last). An entry that no longer parses (a JSON ``ValueError``) is computed and written again. Every
file is written whole or not at all (`erasekit.atomic`), so a killed run leaves no half entry behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from erasekit.store import content_key


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, value: Any) -> None:
    from erasekit.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(value, default=str) + "\n")


def with_record(path: Path) -> bool:
    """Whether ``path`` and the JSON record beside it are both there (`erasekit.store.write_safetensors_atomic`
    writes the record last)."""
    return path.is_file() and path.with_suffix(".json").is_file()


def cache_entry(cache_dir, name: str, parts: Sequence, suffix: str = ".json") -> Path | None:
    """``<cache_dir>/<name>-<content_key(*parts)><suffix>``, or None without a cache folder."""
    if cache_dir is None:
        return None
    return Path(cache_dir) / f"{name}-{content_key(*parts)}{suffix}"


def cached(cache_dir, name: str, parts: Sequence, compute: Callable[[], Any], *, suffix: str = ".json",
           load: Callable[[Path], Any] = read_json, save: Callable[[Path, Any], None] = write_json,
           complete: Callable[[Path], bool] = Path.is_file) -> tuple[Any, str | None]:
    """(value, the entry's path when it was read from the cache, else None); see the module docstring."""
    path = cache_entry(cache_dir, name, parts, suffix)
    if path is not None and complete(path):
        try:
            return load(path), str(path)
        except ValueError:  # a JSON entry that no longer parses: made again below
            pass
    value = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save(path, value)
    return value, None

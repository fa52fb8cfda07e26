"""Generated images on disk: one PNG per image, an ``images.jsonl`` index and a ``grid.png`` overview.

The index makes generation resumable: an image whose record (prompt, seed, settings, model fingerprint)
is already listed, and whose PNG exists, is never generated again. PNGs are written atomically and listed
only after they are complete, so a killed run loses at most the batch in flight.

Crash safety (issue #14): `save_images` writes a batch's PNGs first (each to a temporary name, then renamed),
then appends the batch's rows to the index in one write (`erasekit.jsonl.append_jsonl`, which first repairs a
torn last line, so a new row never joins a torn one). After a crash at any byte, `read_index` returns only rows
that parse and whose PNG exists. A PNG without a readable row (an *orphan*) is never counted: it is not
adopted but regenerated, and since its file name is derived from the record, the regenerated image replaces
it under the same name (one file per image, never two).

Orphans are never deleted (issue #18): a PNG the index does not list may be the user's (an index moved away, a
file copied in), and a run deletes nothing it did not write. Stale temporary files of dead processes are
cleared when a run takes the folder's lock (`erasekit.folder_check`). A row's ``path`` must name a file inside
the folder (`erasekit.paths.inside`); rows that point elsewhere are skipped with a warning.

This is the one store of generated images: ``erasekit generate``, ``erasekit attack`` and the benchmark write through
it (`erasekit.generation.generate_to_dir`), with one key (`record_key`) and one resume rule (a record listed in the
index whose PNG exists). A folder a person browses names its PNGs readably (`image_filename`); the benchmark's
store, where cells share images and thousands accumulate, names them by key in sub-folders (`keyed_filename`).
Processes that write one store at once each append to their own index (``images.p<rank>.jsonl``); `read_index`
reads them all.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from erasekit.errors import ErasekitError
from erasekit.jsonl import append_jsonl, scan_jsonl

INDEX_FILE = "images.jsonl"
GRID_FILE = "grid.png"
INDEX_SHARD_RE = re.compile(r"^images\.p[0-9]+\.jsonl$")  # the index of process <rank> > 0 of a multi-process run
# Everything that determines an image's pixels. The model enters through "target" (`generation.target_key`: base
# fingerprint, edit digests and defence records, marked "+fast" for compiled kernels), an attack's initial latents
# or learned embedding through the content hash in "inputs".
KEY_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "eta", "scheduler", "height", "width",
              "target", "inputs")
MIN_CELL = 128  # grid cells are upscaled (nearest) to at least this many pixels
GRID_MAX_COLUMNS = 16
LABEL_HEIGHT = 14
GAP = 2  # white pixels between cells
# The names `image_filename` gives (`orphan_images` lists such files; erasekit never deletes them).
STORE_NAME_RE = re.compile(r"^[a-z0-9-]+_seed-?[0-9]+_[0-9a-f]{8}\.png$")


def record_key(record: dict) -> str:
    """A short hash of the fields that determine an image (missing fields count as None)."""
    payload = json.dumps({k: record.get(k) for k in KEY_FIELDS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def slug(text: str, max_len: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "empty"


def image_filename(record: dict) -> str:
    """``<prompt-slug>_seed<seed>_<key8>.png``: readable, and distinct for distinct settings."""
    prompt = record.get("prompt")
    return f"{'embeds' if prompt is None else slug(str(prompt))}_seed{record['seed']}_{record_key(record)[:8]}.png"


def keyed_filename(key: str) -> str:
    """``<key[:2]>/<key>.png``: the benchmark's layout (one file per key, shared by every cell that needs it)."""
    return f"{key[:2]}/{key}.png"


def index_name(rank: int = 0) -> str:
    """The index file a process appends to: ``images.jsonl``, or ``images.p<rank>.jsonl`` for process rank > 0."""
    return INDEX_FILE if rank == 0 else f"images.p{rank}.jsonl"


def read_index(out_dir: str | Path) -> dict[str, dict]:
    """Records of ``out_dir/images.jsonl`` whose PNG exists, by key (a later line wins).

    Lines that do not parse (a torn last line left by a killed run, or an older erasekit's record appended onto
    one) are skipped with a warning, and so are rows whose path leads out of the folder. Nothing is deleted."""
    import logging

    from erasekit.paths import inside

    out = Path(out_dir)
    log = logging.getLogger("erasekit")
    found: dict[str, dict] = {}
    outside = 0
    for index, rec in _index_records(out, log):
        path = rec.get("path")
        if not isinstance(path, str) or not path:
            continue
        if not inside(out, path):
            outside += 1
            continue
        if (out / path).is_file():
            key = rec.get("key")
            found[key if isinstance(key, str) else record_key(rec)] = rec
    if outside:
        log.warning("%s: %d row(s) whose path leads out of %s; skipped", out / INDEX_FILE, outside, out)
    return found


def _index_records(out: Path, log):
    """(index file, record) of ``out``'s index and, after it, the shards of other processes (in rank order)."""
    shards = sorted((p for p in out.iterdir() if INDEX_SHARD_RE.match(p.name)),
                    key=lambda p: int(p.name.split(".")[1][1:])) if out.is_dir() else []
    for index in [out / INDEX_FILE, *shards]:
        if index.is_symlink():
            raise ErasekitError(f"{index} is a symbolic link: erasekit does not write through links in an output "
                                f"folder; remove it")
        scan = scan_jsonl(index)
        for number, reason in scan.bad_lines:
            log.warning("%s, line %d: %s; skipped", index, number, reason)
        for rec in scan.records:
            yield index, rec


def orphan_images(out_dir: str | Path, listed: set[str] | None = None) -> list[Path]:
    """PNGs in ``out_dir`` named like the store's images that no readable index row lists."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    if listed is None:
        listed = {r["path"] for r in scan_jsonl(out / INDEX_FILE).records if isinstance(r.get("path"), str)}
    return sorted(p for p in out.iterdir() if STORE_NAME_RE.match(p.name) and p.name not in listed and p.is_file())


def _write_png_atomic(image: np.ndarray, path: Path) -> None:
    from erasekit.atomic import atomic_write

    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def save_images(images: np.ndarray, out_dir: str | Path, records: Sequence[dict], *, grid: bool = True,
                index: str = INDEX_FILE) -> list[dict]:
    """Write uint8 (N, H, W, 3) ``images`` as PNGs, append their ``records`` to the ``index`` (filling in ``key``
    and, unless a record names it, ``path``, relative to ``out_dir``) and, with ``grid``, write ``grid.png`` of
    these images."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(images) != len(records):
        raise ValueError(f"{len(images)} images but {len(records)} records")
    saved = []
    # PNGs first, then all their rows in one append: a crash leaves orphan PNGs (regenerated under the same
    # names) but never a row without its image.
    for image, rec in zip(images, records):
        rec = dict(rec, key=record_key(rec))
        rec.setdefault("path", image_filename(rec))
        path = out / rec["path"]
        if path.parent != out:
            path.parent.mkdir(parents=True, exist_ok=True)
        _write_png_atomic(np.asarray(image, np.uint8), path)
        saved.append(rec)
    append_jsonl(out / index, saved)
    if grid and saved:
        write_grid(out, saved)
    return saved


def load_images(out_dir: str | Path, records: Iterable[dict]) -> list[np.ndarray]:
    return [np.asarray(Image.open(Path(out_dir) / r["path"]).convert("RGB")) for r in records]


def write_grid(out_dir: str | Path, records: Sequence[dict], columns: int | None = None, name: str = GRID_FILE) -> Path:
    """A grid PNG of the records' images, row by row; each row is labelled with its first image's prompt.

    ``columns`` defaults to the number of images of the first prompt (so a row is one prompt), at most 16.
    """
    records = list(records)
    if columns is None:
        first = records[0].get("prompt") if records else None
        columns = sum(1 for r in records if r.get("prompt") == first) or 1
    columns = max(1, min(columns, GRID_MAX_COLUMNS, len(records) or 1))
    images = load_images(out_dir, records)
    h, w = images[0].shape[:2] if images else (MIN_CELL, MIN_CELL)
    scale = max(1, -(-MIN_CELL // max(h, w)))  # integer nearest-neighbour upscale of tiny images
    cell_h, cell_w = h * scale, w * scale
    rows = -(-len(images) // columns)
    row_h = cell_h + LABEL_HEIGHT
    col_w = cell_w + GAP
    canvas = Image.new("RGB", (columns * col_w - GAP, max(1, rows) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, rec) in enumerate(zip(images, records)):
        r, c = divmod(i, columns)
        if c == 0:
            draw.text((2, r * row_h + 1), str(rec.get("prompt", ""))[: columns * col_w // 6], fill="black")
        cell = Image.fromarray(image).resize((cell_w, cell_h), Image.Resampling.NEAREST)
        canvas.paste(cell, (c * col_w, r * row_h + LABEL_HEIGHT))
    from erasekit.atomic import atomic_write

    return atomic_write(Path(out_dir) / name, lambda tmp: canvas.save(tmp, format="PNG"))

"""Prompt sets for preservation and quality: a COCO-captions CSV in the field's layout, and its reference images.

The CSV has a ``prompt`` column, ``evaluation_seed`` (the seed of that row's image; optional: then the bench's
seeds) and optionally ``image_id`` (the COCO image the caption describes), as the COCO-30k / coco_10k prompt files
of ESD, UCE, MACE and UnlearnDiffAtk do. Reference images are a folder (e.g. COCO val2014 / val2017): an ``image_id``
is found as ``<id>.<ext>``, ``<12-digit id>.<ext>`` or ``COCO_val2014_<12-digit id>.<ext>``; without ids every image in
the folder is a reference. Images are resized (shortest edge, bicubic) and centre-cropped to the generated size.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from erasekit.errors import ErasekitError

MAX_ROWS = 200_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_prompt_csv(path) -> list[dict]:
    """[{prompt, seed (int or None), image_id (str or None)}] from a COCO-captions-layout CSV."""
    path = Path(path)
    if not path.is_file():
        raise ErasekitError(f"{path}: no such prompt file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in reader.fieldnames or []]
            if "prompt" not in fields:
                raise ErasekitError(f"{path} needs a 'prompt' column (columns: {', '.join(fields) or 'none'})")
            rows = []
            for i, raw in enumerate(reader):
                if i >= MAX_ROWS:
                    raise ErasekitError(f"{path} has more than {MAX_ROWS} rows")
                row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
                prompt = row.get("prompt", "")
                if not prompt:
                    raise ErasekitError(f"{path} row {i + 2}: empty prompt")
                seed = row.get("evaluation_seed", "")
                if seed and not seed.lstrip("-").isdigit():
                    raise ErasekitError(f"{path} row {i + 2}: evaluation_seed {seed!r} is not an integer")
                if seed and not 0 <= int(seed) < 2**62:
                    raise ErasekitError(f"{path} row {i + 2}: evaluation_seed {seed} out of range")
                rows.append({"prompt": prompt, "seed": int(seed) if seed else None,
                             "image_id": row.get("image_id") or None})
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ErasekitError(f"{path}: unreadable CSV ({type(exc).__name__})") from None
    if not rows:
        raise ErasekitError(f"{path} holds no prompts")
    return rows


def _find(folder: Path, image_id: str, files: dict[str, Path]) -> Path:
    stems = [image_id]
    if image_id.isdigit():
        stems += [f"{int(image_id):012d}", f"COCO_val2014_{int(image_id):012d}", f"COCO_train2014_{int(image_id):012d}"]
    for stem in stems:
        if stem in files:
            return files[stem]
    raise ErasekitError(f"{folder}: no reference image for image_id {image_id} (looked for {', '.join(stems[:3])}.*)")


def _fit(im, size: int) -> np.ndarray:
    from PIL import Image

    im = im.convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    if (w, h) != (size, size):
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im)


def reference_images(folder, size: int, ids=None, limit: int = MAX_ROWS) -> tuple[np.ndarray, list[str]]:
    """(uint8 (N, size, size, 3), file names) of the folder's images (those of ``ids`` when given, in that order)."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise ErasekitError(f"reference images {folder}: no such folder")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    paths = [_find(folder, str(i), files) for i in ids] if ids else list(files.values())[:limit]
    if not paths:
        raise ErasekitError(f"reference images {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for p in paths:
        try:
            with Image.open(p) as im:
                arrays.append(_fit(im, size))
        except (UnidentifiedImageError, OSError) as exc:
            raise ErasekitError(f"reference image {p} is unreadable ({type(exc).__name__})") from None
    return np.stack(arrays), [p.name for p in paths]

"""Concept images for the attacks that learn from images (textual inversion, DDIM inversion).

From a folder: every image file, sorted by name, converted to RGB and resized to the pipeline's size when it is
not (a note says so); a file with an image suffix that does not open, or a folder holding no image at all, is
refused with a clear error. Other files (notes, JSON) are skipped. Without a folder the target's world supplies
them (`World.concept_images`; the embedded world renders them: the concept fixed, every other attribute random).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from erasekit.errors import ErasekitError
from erasekit.worlds.toy import render_concept_images  # noqa: F401  (the embedded world's renders; imported from here)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Bound on decoded size, read from the file's header before any pixel is decoded: a small file can declare
# 30000x30000 pixels (2.7 GB decoded). 8192x8192 is more than any diffusion model here makes.
MAX_IMAGE_PIXELS = 8192 * 8192


def open_image(path, what: str = "image"):
    """The RGB image at ``path``, its size checked from the header first; `ErasekitError` for anything unreadable,
    a decompression bomb included."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ErasekitError(f"{path}: {w}x{h} pixels is too large an {what} (at most {MAX_IMAGE_PIXELS:,} "
                                    f"pixels, e.g. 8192x8192); resize it first")
            im.load()
            return im.convert("RGB") if im.mode != "RGB" else im.copy()
    except Image.DecompressionBombError:
        raise ErasekitError(f"{path}: too large an {what} (PIL's decompression-bomb limit); resize it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ErasekitError(f"{path} is not a readable {what} ({type(exc).__name__})") from None


def image_files(folder) -> list[Path]:
    """The image files of ``folder`` (by suffix), sorted by name; `ErasekitError` when there is none."""
    folder = Path(folder)
    if not folder.exists():
        raise ErasekitError(f"image folder {folder}: no such folder")
    if not folder.is_dir():
        raise ErasekitError(f"image folder {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ErasekitError(f"image folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def load_image_folder(folder, size: int | tuple[int, int], notes: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """uint8 (N, H, W, 3) RGB images of ``folder`` at ``size`` and their file names; appends conversions to ``notes``."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    height, width = (size, size) if isinstance(size, int) else size
    files = image_files(folder)
    arrays, converted = [], {"mode": [], "size": []}
    for path in files:
        try:
            with Image.open(path) as im:
                if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:  # from the header: bounded before decoding
                    raise ErasekitError(f"{path}: {im.size[0]}x{im.size[1]} pixels is too large an image (at most "
                                        f"{MAX_IMAGE_PIXELS:,} pixels); resize it or remove it from {folder}")
                im.load()
                if im.mode != "RGB":
                    converted["mode"].append(f"{path.name} ({im.mode})")
                    im = im.convert("RGB")
                if im.size != (width, height):
                    converted["size"].append(f"{path.name} ({im.size[0]}x{im.size[1]})")
                    im = _center_crop_resize(im, width, height)
                arrays.append(np.asarray(im, dtype=np.uint8))
        except Image.DecompressionBombError:
            raise ErasekitError(f"{path}: too large an image (PIL's decompression-bomb limit); resize it or remove "
                                f"it from {folder}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise ErasekitError(f"{path} is not a readable image ({type(exc).__name__}); remove it from {folder}") from exc
    for what, names in converted.items():
        if names:
            target = "RGB" if what == "mode" else f"{width}x{height}"
            note = f"{len(names)} image(s) in {folder} converted to {target}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            log.warning(note)
            if notes is not None:
                notes.append(note)
    return np.stack(arrays), [p.name for p in files]


def _center_crop_resize(im, width: int, height: int):
    from PIL import Image

    w, h = im.size
    target = width / height
    if abs(w / h - target) > 1e-6:  # crop the longer side to the target aspect ratio
        if w / h > target:
            new_w = round(h * target)
            left = (w - new_w) // 2
            im = im.crop((left, 0, left + new_w, h))
        else:
            new_h = round(w / target)
            top = (h - new_h) // 2
            im = im.crop((0, top, w, top + new_h))
    return im.resize((width, height), Image.Resampling.BICUBIC if im.size[0] < width else Image.Resampling.LANCZOS)


def images_digest(images: np.ndarray, n_chars: int = 16) -> str:
    arr = np.ascontiguousarray(images, dtype=np.uint8)
    h = hashlib.sha256(str(arr.shape).encode())
    h.update(arr.data)
    return h.hexdigest()[:n_chars]


class ConceptImages:
    """Concept images for one attack, their names, their ground truth when rendered, and their content digest."""

    def __init__(self, images: np.ndarray, names: list[str], truth: list[dict] | None):
        self.images, self.names, self.truth = images, names, truth
        self.digest = images_digest(images)


def concept_images(target, concept: str, n: int | None, folder, render_seed: int, notes: list[str]) -> ConceptImages:
    """The images of ``folder`` (at most ``n``, resized to the target's size), or, without a folder, ``n`` images
    the target's world renders (render seeds ``render_seed + i``)."""
    from erasekit.diffusion.vae import image_size

    size = image_size(target.pipe)
    if folder is not None:
        images, names = load_image_folder(folder, size, notes)
        if n is not None and len(images) > n:
            images, names = images[:n], names[:n]
        return ConceptImages(images, names, None)
    images, names, truth = target.world.concept_images(concept, n, size, render_seed)
    return ConceptImages(images, names, truth)

"""What every concept detector offers: a per-image score, a yes/no decision, and a description for results.

A detector takes uint8 RGB images (N, H, W, 3) and returns one dict per image with at least
``score`` (a float in [0, 1]) and ``present`` (``score > threshold``: strictly above, as the NudeNet
evaluation code of UnlearnDiffAtk and RECE does). ``info()`` is recorded in every result file, so a
number can always be traced to the detector, preset, classes and threshold behind it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from erasekit.errors import ErasekitError


@runtime_checkable
class Detector(Protocol):
    name: str
    threshold: float

    def info(self) -> dict: ...

    def score(self, images) -> list[dict]: ...


def as_uint8_rgb(images) -> np.ndarray:
    """uint8 (N, H, W, 3) from an array of that shape, one (H, W, 3) array, or a list of PIL images / arrays."""
    if isinstance(images, np.ndarray):
        arr = images[None] if images.ndim == 3 else images
    else:
        items = list(images)
        if not items:
            return np.zeros((0, 1, 1, 3), np.uint8)
        arr = np.stack([np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in items])
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ErasekitError(f"detectors take uint8 RGB images (N, H, W, 3), got {arr.dtype} {tuple(arr.shape)}")
    return arr

"""Concept detectors, registered in `erasekit.registry.DETECTORS`: the embedded world's classifier and NudeNet presets.

``create_detector("toy", concept="star")``, ``create_detector("nudenet:rece")``. Every detector records its name,
preset and threshold (``info()``), and decides "concept present" by one rule: its score for the concept is strictly
above its threshold.
"""

from __future__ import annotations

from erasekit.detectors.base import Detector, as_uint8_rgb
from erasekit.errors import ErasekitError
from erasekit.registry import DETECTORS

# Importing a detector module registers it.
from erasekit.detectors import nudenet, toy  # noqa: E402,F401  isort:skip


def create_detector(spec: str, concept: str | None = None, threshold: float | None = None, **kwargs) -> Detector:
    """A detector by registered name (``toy``, ``nudenet``, ``nudenet:<preset>``)."""
    cls, preset = DETECTORS.split(spec)
    if preset is not None or getattr(cls, "presets", ()):
        if kwargs:
            raise ErasekitError(f"detector {spec!r} takes no options {', '.join(kwargs)}")
        return cls(preset, threshold)
    if threshold is not None:
        kwargs["threshold"] = threshold
    return cls(concept, **kwargs)


__all__ = ["Detector", "as_uint8_rgb", "create_detector"]

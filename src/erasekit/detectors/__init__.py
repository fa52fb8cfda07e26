"""Concept detectors, registered in `erasekit.registry.DETECTORS`: the embedded world's classifier, NudeNet presets,
and judges built on transformers models (clip, imagenet, q16, hf-classifier).

``create_detector("toy", concept="star")``, ``create_detector("nudenet:rece")``,
``create_detector("clip:model=FOLDER,alternatives=a photo;a painting", concept="Van Gogh")``. Every detector records
its name, preset and threshold (``info()``; the transformers judges also their model's fingerprint and settings), and
decides "concept present" by its rule: its score for the concept is strictly above its threshold (imagenet: the
class is in the top-k).
"""

from __future__ import annotations

from erasekit.detectors.base import Detector, as_uint8_rgb
from erasekit.errors import ErasekitError
from erasekit.registry import DETECTORS

# Importing a detector module registers it.
from erasekit.detectors import nudenet, toy  # noqa: E402,F401  isort:skip


def parse_spec(spec: str) -> tuple[type, str | None, dict[str, str]]:
    """(class, preset, settings) for ``name``, ``name:preset`` or ``name:key=value,key=value`` (judges with
    settings; a list inside a value is ';'-separated)."""
    name, _, rest = str(spec).strip().partition(":")
    if "=" not in rest:
        cls, preset = DETECTORS.split(spec)
        return cls, preset, {}
    cls = DETECTORS.get(name)
    if not getattr(cls, "spec_settings", False):
        raise ErasekitError(f"detector {name!r} takes no settings in its name ({spec!r})")
    settings: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ErasekitError(f"--detector {spec!r}: settings are key=value, separated by commas")
        if key.strip() in settings:
            raise ErasekitError(f"--detector {spec!r}: {key.strip()} given twice")
        settings[key.strip()] = value.strip()
    return cls, None, settings


def check_spec(spec: str, settings: dict | None = None) -> None:
    """Parse and validate a detector spec and extra settings without loading any model (fail before work)."""
    cls, _, parsed = parse_spec(spec)
    extra = {**parsed, **(settings or {})}
    if extra:
        if not getattr(cls, "spec_settings", False):
            raise ErasekitError(f"detector {cls.name!r} takes no settings ({', '.join(extra)})")
        cls.Settings().replace(extra)


def create_detector(spec: str, concept: str | None = None, threshold: float | None = None, **kwargs) -> Detector:
    """A detector by registered name (``toy``, ``nudenet``, ``nudenet:<preset>``, ``clip:model=FOLDER,...``)."""
    cls, preset, settings = parse_spec(spec)
    if getattr(cls, "spec_settings", False):
        merged = {**settings, **kwargs}
        if threshold is not None:
            merged["threshold"] = threshold
        return cls(concept, **merged)
    if preset is not None or getattr(cls, "presets", ()):
        if kwargs:
            raise ErasekitError(f"detector {spec!r} takes no options {', '.join(kwargs)}")
        return cls(preset, threshold)
    if threshold is not None:
        kwargs["threshold"] = threshold
    return cls(concept, **kwargs)


def judge_fields(info: dict) -> dict:
    """What a result row records of a judge built on a model: its folder, fingerprint and settings (none for the
    toy detector and NudeNet, whose name and preset say it all)."""
    if "model_fingerprint" not in info:
        return {}
    return {"judge_model": info["model"], "judge_fingerprint": info["model_fingerprint"],
            "judge_settings": info.get("settings")}


__all__ = ["Detector", "as_uint8_rgb", "check_spec", "create_detector", "judge_fields", "parse_spec"]

"""Inference-time defences: they change how a target samples, not its weights, and compose with weight edits.

A defence is a registered component (`erasekit.registry.DEFENCES`) with validated settings. Around each batch it
may wrap the guidance (`wrap`: a denoiser wrapper, e.g. another branch or another combination) and add step hooks
(`hooks`: read and replace latents, model output and x0 at each step; `erasekit.diffusion.sampler`). Its record
(name + resolved settings) is part of every image's cache key, so images of different defences never mix.

    --defence negative_prompt:text=star          (command line; repeat to stack)
    Target(pipe).with_defences(parse_defence("negative_prompt:text=star"))
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from erasekit.errors import ErasekitError
from erasekit.settings import Settings


class Defence:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Settings: ClassVar[type[Settings]] = Settings
    needs_unet: ClassVar[bool] = True  # False: runs on transformer families too (`erasekit.diffusion.support`)

    def __init__(self, settings: Settings | None = None):
        self.settings = settings if settings is not None else self.Settings()
        self.settings.validate()

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any] | None = None) -> "Defence":
        return cls(cls.Settings().replace(overrides or {}))

    def record(self) -> dict:
        return {"name": self.name, "settings": self.settings.to_dict()}

    def wrap(self, guidance, ctx):
        """The guidance to sample with (default: unchanged)."""
        return guidance

    def hooks(self, ctx) -> list:
        """Step hooks for this batch (default: none)."""
        return []


def parse_defence(spec: str, concept: str | None = None) -> Defence:
    """``name`` or ``name:key=value,key=value`` -> a defence with those settings (checked).

    ``concept``: the command's concept; a defence with a ``concept`` setting not given in ``spec`` takes it, and
    "{concept}" in a text setting is replaced by it (as the bench does per cell)."""
    from erasekit.limits import shown
    from erasekit.registry import DEFENCES

    name, _, rest = str(spec).strip().partition(":")
    cls = DEFENCES.get(name)
    overrides: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ErasekitError(f"--defence {shown(spec)!r}: settings are key=value, separated by commas")
        if key.strip() in overrides:
            raise ErasekitError(f"--defence {shown(spec)!r}: {shown(key.strip())} given twice")
        overrides[key.strip()] = value.strip()
    takes_concept = "concept" in cls.Settings.keys()
    if concept is not None and concept.strip():
        overrides = {k: v.replace("{concept}", concept.strip()) for k, v in overrides.items()}
        if takes_concept and not overrides.get("concept", "").strip():
            overrides["concept"] = concept.strip()
    elif takes_concept and not overrides.get("concept", "").strip():
        try:
            return cls.from_overrides(overrides)
        except ErasekitError as exc:  # this defence needs a concept and the command has none
            raise ErasekitError(f"{exc} (or give the command --concept <concept>)") from None
    return cls.from_overrides(overrides)

"""A weight-editing method, and `erase`: compute an edit from a pipeline and a concept, with its cost recorded."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from erasekit.erasers.base import WeightEdit
from erasekit.diffusion.support import check_runs_on
from erasekit.erasers.concept import ConceptSpec, resolve_spec
from erasekit.settings import Settings


@dataclass
class Result:
    """What a method computes: new values of the tensors it changed (pipeline untouched afterwards)."""

    tensors: dict[str, torch.Tensor]
    solve_s: float  # the method's own work: closed-form steps, or the fine-tuning loop
    extra: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    name: str = ""
    summary: str = ""
    Settings: type[Settings] = Settings
    # Whether one edit may erase several concepts (mass erasure: --concept repeated, --concepts-file, the bench's
    # erase: lists); a method that erases one concept at a time refuses a list of several.
    several_concepts: bool = True
    needs_unet: bool = True  # False: runs on transformer families too (`erasekit.diffusion.support`)

    @abstractmethod
    def compute(self, pipe, spec: ConceptSpec, settings, progress: bool = True) -> Result:
        """Compute the edit; must leave ``pipe``'s weights as they were."""

    @classmethod
    def resolve_settings(cls, pipe, overrides: Mapping[str, Any] | None = None, concepts: str | Sequence[str] = ()):
        """The method's defaults, then its world's defaults for ``pipe``'s model family and ``concepts``, then
        ``overrides``."""
        from erasekit.worlds import world_of

        concepts = (concepts,) if isinstance(concepts, str) else tuple(concepts)
        return cls.Settings().replace(world_of(pipe).method_defaults(cls.name, concepts)).replace(overrides or {})


def default_preserve(pipe, method: str, concepts: str | Sequence[str]) -> list[str]:
    """What ``method`` keeps intact by default when erasing ``concepts`` on ``pipe``: the preservation set its
    world's tuned defaults assume (toy: the other shapes for uce / rece / esd-u), the same for every entry point."""
    from erasekit.worlds import world_of

    concepts = (concepts,) if isinstance(concepts, str) else tuple(concepts)
    return world_of(pipe).method_preserve(method, concepts)


def erase(pipe, method: str, concepts: str | Sequence[str], guide: str | None = None,
          preserve: Sequence[str] | None = None, settings: Mapping[str, Any] | None = None,
          progress: bool = True) -> WeightEdit:
    """Compute ``method``'s edit of ``pipe`` for ``concepts``; the pipeline is unchanged, call ``.apply(pipe)``.

    ``preserve``: concepts to keep intact; None: `default_preserve` (the world's tuned defaults come with their
    preservation set), ``()``: none.

    ``settings``: overrides of the method's defaults for this model (strings as from ``--set``, or values).
    The edit records the resolved settings, the concept spec, the base model's fingerprint and the cost.
    """
    from erasekit.metrics.cost import measure_cost
    from erasekit.models import fingerprint
    from erasekit.registry import ERASERS

    cls = ERASERS.get(method)
    check_runs_on(cls, "eraser", pipe)
    cls.Settings.parse(settings or {})  # fail on unknown keys / types before any work
    base_fp = fingerprint(pipe)
    if preserve is None:
        preserve = default_preserve(pipe, cls.name, concepts)
    with measure_cost() as cost:
        spec = resolve_spec(pipe, concepts, guide, preserve)
        resolved = cls.resolve_settings(pipe, settings, spec.concepts)
        result = cls().compute(pipe, spec, resolved, progress=progress)
    from erasekit.validity import check_finite_tensors

    # NaN weights make black images, which would read as a perfect erasure (#18): refuse them before anything saves.
    check_finite_tensors(result.tensors, f"the {cls.name} edit of {', '.join(map(repr, spec.concepts))}",
                         "the method diverged (try a smaller lr or fewer iterations); nothing was saved")
    timings = cost.as_dict()
    timings["solve_s"] = round(result.solve_s, 4)
    timings.pop("images", None)
    return WeightEdit(
        method=cls.name,
        tensors=result.tensors,
        settings=resolved.to_dict(),
        spec=spec.as_dict(),
        base_fingerprint=base_fp,
        base_dtype=str(_denoiser_dtype(pipe)),
        timings=timings,
        extra=result.extra,
    )


def _denoiser_dtype(pipe):
    from erasekit.diffusion.family import family_of

    return family_of(pipe).denoiser(pipe).dtype

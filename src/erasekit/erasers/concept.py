"""What to erase: the concept text(s), the guide they are mapped to, and the concepts to keep intact."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from erasekit.errors import ErasekitError

# Stable Diffusion's usual guide: the empty prompt (objects, nudity). Styles are usually guided to "art".
SD_DEFAULT_GUIDE = ""


@dataclass(frozen=True)
class ConceptSpec:
    concepts: tuple[str, ...]
    guide: str = SD_DEFAULT_GUIDE
    preserve: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}



def default_guide(pipe, concepts: Sequence[str]) -> str:
    """The neutral guide for ``concepts`` on ``pipe``: its world's (the empty prompt on Stable Diffusion)."""
    from erasekit.worlds import world_of

    return world_of(pipe).guide(concepts)


def resolve_spec(pipe, concepts: str | Sequence[str], guide: str | None = None,
                 preserve: Sequence[str] = ()) -> ConceptSpec:
    """A checked `ConceptSpec`: every concept and preserved concept must encode to word tokens on ``pipe``."""
    from erasekit.erasers.tokens import check_encodes

    concepts = (concepts,) if isinstance(concepts, str) else tuple(concepts)
    concepts = tuple(c.strip() for c in concepts)
    if not concepts:
        raise ErasekitError("give a concept to erase (--concept)")
    for c in concepts:
        check_encodes(pipe, c, "concept")
    # "" (or blank) preserved is the empty prompt (the unconditional states the official UCE/RECE code keeps)
    preserve = tuple(dict.fromkeys(p.strip() for p in preserve))
    for p in preserve:
        if p:
            check_encodes(pipe, p, "preserved concept")
    overlap = set(concepts) & set(preserve)
    if overlap:
        raise ErasekitError(f"{', '.join(sorted(overlap))}: asked both to erase and to preserve")
    if guide is None:
        guide = default_guide(pipe, concepts)
    return ConceptSpec(concepts, guide, preserve)

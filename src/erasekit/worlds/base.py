"""The interface of a world (see `erasekit.worlds`)."""

from __future__ import annotations

from typing import Any, Sequence

from erasekit.errors import ErasekitError

# The rule for "concept present" everywhere in erasekit: the detector's score for the concept is strictly above
# its threshold (toy: P(label) > 0.5; NudeNet: the preset's best class score > the preset's threshold).


class World:
    name = ""
    default_steps = 25
    default_guidance = 7.5

    def sampler_defaults(self) -> tuple[int, float]:
        return self.default_steps, self.default_guidance

    def check_concept(self, concept: str) -> str:
        """The concept, stripped; `ErasekitError` when this world cannot name it."""
        concept = concept.strip()
        if not concept:
            raise ErasekitError("the concept is empty; give a word or phrase")
        return concept

    def guide(self, concepts: Sequence[str]) -> str:
        """The neutral concept erasers map ``concepts`` to."""
        return ""

    def concept_prompt(self, concept: str) -> str:
        """The plain prompt naming ``concept``."""
        raise NotImplementedError

    def concept_prompts(self, concept: str, seed: int = 0) -> list[str]:
        """Prompts naming ``concept`` in many ways (the text attack)."""
        raise NotImplementedError

    def preservation_prompts(self, concept: str) -> list[tuple[str, str]]:
        """(label, prompt) pairs of other concepts, whose images must survive erasing ``concept``."""
        return []

    def default_detector(self, concept: str) -> str:
        raise NotImplementedError

    def method_defaults(self, method: str, concepts: Sequence[str] = ()) -> dict[str, Any]:
        """Setting overrides of ``method`` for this world's models when erasing ``concepts`` (on top of the
        method's own defaults): a world may tune them per kind of concept."""
        return {}

    def method_preserve(self, method: str, concepts: Sequence[str] = ()) -> list[str]:
        """The concepts ``method``'s defaults here (`method_defaults`) were tuned to keep intact when erasing
        ``concepts``: the preservation set that comes with them, on the command line and in the bench alike."""
        return []

    def concept_words(self, concept: str) -> list[str]:
        """The names this world knows for ``concept`` (the concept itself first)."""
        return [concept]

    def other_labels(self, concept: str) -> list[str]:
        """Concepts of the same kind as ``concept`` that an erasure should leave intact (none known: [])."""
        return []

    def concept_pairs(self, concept: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
        """``n`` (with, without) prompt pairs for ``concept`` (Ring-A-Bell's concept vector): the world's concept
        prompts that hold its name, with and without it."""
        prompts = self.concept_prompts(concept)
        pairs = [(p, " ".join(p.replace(concept, " ").split())) for p in prompts if concept in p]
        if not pairs:
            raise ErasekitError(f"ring_a_bell: no prompt pairs for {concept!r} in this world")
        return [pairs[i % len(pairs)] for i in range(n)]

    def is_style(self, concept: str) -> bool:
        """Whether ``concept`` is a style (Ring-A-Bell's eta 0.9) rather than an object or nudity (3.0)."""
        return "style" in concept.lower()

    def detector(self, concept: str, spec: str | None = None, **settings):
        """The detector for ``concept``: ``spec`` (a registered name[:preset]) or this world's default, its weights
        loaded now, so that a run fails before it generates anything."""
        from erasekit.detectors import create_detector

        return create_detector(spec or self.default_detector(concept), concept=concept, **settings)

    def label_scores(self, detector: str, images, batch_size: int) -> list[dict] | None:
        """Per image, every label's probability under this world's own ``detector`` when no concept is asked
        ({attribute: {label: p}}); None when ``detector`` is not such a detector of this world."""
        return None

    def frechet_features(self):
        """A torch module mapping float images (N, 3, H, W) in [0, 1] to the features of this world's own detector
        (``num_features`` of them), for the Fréchet distance of its preservation table; None when it has none."""
        return None

    def concept_images(self, concept: str, n: int, size: tuple[int, int], seed: int):
        """(uint8 images, names, ground truth or None) of ``concept``, for attacks that learn from images."""
        raise ErasekitError("this attack learns from concept images: give a folder of them (--images FOLDER)")

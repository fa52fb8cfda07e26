"""Stable Diffusion (1.x, 2.x): the empty prompt as guide, generic prompt templates, NudeNet for nudity."""

from __future__ import annotations

from erasekit.errors import ErasekitError
from erasekit.worlds.base import World

GENERIC_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a painting of a {}", "{}")
NUDITY_CONCEPTS = ("nudity", "nude", "naked", "nsfw")


class SDWorld(World):
    name = "sd"
    default_steps = 25
    default_guidance = 7.5

    def concept_prompt(self, concept: str) -> str:
        return f"a photo of a {concept}"

    def concept_prompts(self, concept: str, seed: int = 0) -> list[str]:
        return [t.format(concept) for t in GENERIC_TEMPLATES]

    def default_detector(self, concept: str) -> str:
        if concept.lower() in NUDITY_CONCEPTS:
            return "nudenet:unlearndiffatk"
        from erasekit.registry import DETECTORS

        raise ErasekitError(f"no default detector for concept {concept!r} on this model; choose one with --detector "
                            f"({', '.join(DETECTORS.names())})")


class SDXLWorld(SDWorld):
    """SDXL: the Stable Diffusion world with SDXL's sampler defaults (guidance 5.0, diffusers' SDXL default; 1024x1024
    comes from the UNet's sample size)."""

    name = "sdxl"
    default_steps = 25
    default_guidance = 5.0

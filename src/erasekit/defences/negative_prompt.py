"""Negative prompt: the concept's text takes the unconditional branch's place in classifier-free guidance, so that
guidance pushes away from the concept (``u + s (c - u)`` with u the concept's prediction)."""

from __future__ import annotations

from dataclasses import dataclass

from erasekit.defences.base import Defence
from erasekit.errors import ErasekitError
from erasekit.registry import DEFENCES
from erasekit.settings import Settings


@dataclass
class NegativePromptSettings(Settings):
    text: str = ""  # the negative prompt, e.g. the concept's name

    def validate(self) -> None:
        if not self.text.strip():
            raise ErasekitError("negative_prompt needs its text: --defence negative_prompt:text=<concept>")


@DEFENCES.register
class NegativePrompt(Defence):
    needs_unet = False  # the family's denoiser only: SD3 and FLUX.1 too
    name = "negative_prompt"
    summary = "the concept as classifier-free guidance's negative prompt"
    Settings = NegativePromptSettings

    def wrap(self, guidance, ctx):
        from erasekit.diffusion.guidance import ClassifierFreeGuidance

        if not isinstance(guidance, ClassifierFreeGuidance):
            return guidance  # no guidance (scale <= 1): a negative prompt has nothing to act on, as in diffusers
        pipe, family = ctx.target.pipe, ctx.target.family
        wrapped = guidance.select(slice(None))
        wrapped.branches = dict(guidance.branches,
                                uncond=family.encode(pipe, [self.settings.text], device=family.denoiser(pipe).device))
        return wrapped

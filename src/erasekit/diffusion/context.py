"""What a defence sees when it is installed around one batch of sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

from erasekit.diffusion.conditioning import Conditioning


@dataclass
class SamplingContext:
    target: object  # the `Target` sampling (its pipeline, world, edits; `target.without_edits()` for the original)
    sampler: object  # the `Sampler`
    prompts: list[str] | None  # the batch's prompts (None when it samples from ready-made text states)
    cond: Conditioning  # the batch's conditioning
    uncond: Conditioning | None  # the unconditional (or negative-prompt) conditioning, when guidance uses one
    scale: float  # the guidance scale
    seeds: list[int] | None = None  # the batch's image seeds (per-image randomness of a defence derives from them)
    notes: dict = field(default_factory=dict)  # per-run measurements a defence wants recorded

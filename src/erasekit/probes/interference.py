"""Interference (Lu et al.): the erased model prompted with the OTHER concepts (side effects of the erasure).

Prompts: the world's preservation prompts (the other shapes / textures in full captions), cycled. The scenario's
detector still scores the erased concept, so its rate here is how often the concept leaks into images of the
others; each image's record carries the label it asked for (``requested``), from which one can measure (as
benchmarks/eval_probes.md's preservation column does) how often the requested concept is drawn (the damage to the
others), against the original model.
"""

from __future__ import annotations

from dataclasses import dataclass

from erasekit.attacks.base import AttackContext, AttackInputs
from erasekit.errors import ErasekitError
from erasekit.probes.base import Probe, Timer, remembered
from erasekit.registry import PROBES
from erasekit.settings import Settings


@dataclass
class InterferenceSettings(Settings):
    prompts: str = ""  # ";"-separated label=prompt pairs replacing the world's preservation prompts


@PROBES.register
class Interference(Probe):
    name = "interference"
    summary = "interference: the erased model prompted with the other concepts (world.preservation_prompts)"
    needs_unet = False  # prompts only
    Settings = InterferenceSettings
    scenarios = {"probe-interference": {}}

    def inputs(self, ctx: AttackContext) -> AttackInputs:
        timer = Timer()
        world = ctx.target.world
        concept = world.check_concept(ctx.concept)
        pairs = []
        for part in self.settings.prompts.split(";"):
            if part.strip():
                label, sep, prompt = part.partition("=")
                if not sep or not label.strip() or not prompt.strip():
                    raise ErasekitError(f"interference: prompts are label=prompt pairs separated by ';', got {part!r}")
                pairs.append((label.strip(), prompt.strip()))
        pairs = pairs or list(world.preservation_prompts(concept))
        if not pairs:
            raise ErasekitError(f"interference: this world has no other concepts for {concept!r}; give "
                                f"--set interference.prompts='label=prompt;...'")
        chosen = [pairs[i % len(pairs)] for i in range(ctx.n)]
        return AttackInputs(prompts=[p for _, p in chosen], seeds=[ctx.seed + i for i in range(ctx.n)],
                            items=[{"probe": "interference", "requested": label} for label, _ in chosen],
                            attack=self.name,
                            budget=remembered(ctx, self.name, dict(target=ctx.target.cache_id, chosen=chosen,
                                                                   seed=ctx.seed),
                                              {"pairs": len(pairs), "optimisation_steps": 0, "images_used": 0,
                                               "wall_s": timer.seconds()}))

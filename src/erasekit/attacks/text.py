"""The text scenario: prompts that name the concept.

The prompts come from the model's world (the embedded world: its caption templates with every synonym of the
concept and the paraphrases training never saw, "a starfish", "a pentagram"; Stable Diffusion: a few generic
templates), from the ``prompts`` setting, or from an I2P-layout CSV (``--prompts``, `erasekit.attacks.i2p`: per-row
seed and guidance). Image i gets prompt ``i mod P`` and seed ``seed + i``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from erasekit.attacks.base import Attack, AttackContext, AttackInputs
from erasekit.errors import ErasekitError
from erasekit.registry import ATTACKS
from erasekit.settings import Settings


@dataclass
class TextSettings(Settings):
    prompts: str = ""  # ";"-separated prompts replacing the world's (empty: the world's)

    def validate(self) -> None:
        if self.prompts.strip() and not any(p.strip() for p in self.prompts.split(";")):
            # ";;;" names no prompt: falling back to the world's prompts would attack with what was not asked for
            raise ErasekitError(f"setting prompts={self.prompts.strip()[:20]!r}: no prompt between the ';' (leave "
                                f"it empty for the world's prompts)")


def text_inputs(prompts: list[str], n: int, seed: int = 0) -> AttackInputs:
    """``n`` images cycling over ``prompts``, seeds ``seed + i``."""
    t0 = time.perf_counter()
    if n < 1:
        raise ErasekitError(f"-n must be at least 1, got {n}")
    if not prompts:
        raise ErasekitError("no prompts to attack with")
    return AttackInputs(
        attack="text",
        prompts=[prompts[i % len(prompts)] for i in range(n)],
        seeds=[seed + i for i in range(n)],
        budget={"prompts": len(prompts), "images_used": 0, "optimisation_steps": 0,
                "wall_s": round(time.perf_counter() - t0, 4)},
    )


@ATTACKS.register
class TextAttack(Attack):
    needs_unet = False  # the family's denoiser only: SD3 and FLUX.1 too
    name = "text"
    summary = "prompts naming the concept: the world's templates, synonyms and held-out paraphrases, or an I2P CSV"
    Settings = TextSettings
    order = 0
    scenarios = {"text": {}}

    def inputs(self, ctx: AttackContext) -> AttackInputs:
        if ctx.prompts_csv is not None:
            from erasekit.attacks.i2p import i2p_inputs, load_i2p_csv

            return i2p_inputs(load_i2p_csv(ctx.prompts_csv), ctx.n)
        world = ctx.target.world
        given = [p.strip() for p in self.settings.prompts.split(";") if p.strip()]
        return text_inputs(given or world.concept_prompts(world.check_concept(ctx.concept)), ctx.n, seed=ctx.seed)

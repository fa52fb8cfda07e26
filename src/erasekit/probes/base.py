"""What the probes share: prompts and seeds of a scenario, the concept images, and the probe base class.

A probe is an `erasekit.attacks.base.Attack` registered in `erasekit.registry.PROBES`: it declares its scenarios
("probe-inpainting", ...), runs through `erasekit attack --scenario` and the benchmark like any attack, and hands
the scenario runner `AttackInputs` whose ``generate`` override does its sampling (`erasekit.probes.sampling`).
"""

from __future__ import annotations

import time

from erasekit.attacks.base import Attack, AttackContext
from erasekit.errors import ErasekitError


class Probe(Attack):
    """Base of the probes of Lu et al. (guidance-based avoidance vs destruction-based removal)."""

    order = 50


def steps_of(ctx: AttackContext) -> int:
    return int(ctx.steps or ctx.target.world.sampler_defaults()[0])


def concept_prompt_list(ctx: AttackContext, prompt_mode: str = "world") -> list[str]:
    """The prompts a probe conditions on: the world's prompts naming the concept (as the text scenario), the
    concept's plain prompt, or the empty prompt."""
    world = ctx.target.world
    concept = world.check_concept(ctx.concept)
    if prompt_mode == "empty":
        return [""]
    if prompt_mode == "concept":
        return [world.concept_prompt(concept)]
    return world.concept_prompts(concept)


def cycle(prompts: list[str], n: int) -> list[str]:
    if not prompts:
        raise ErasekitError("no prompts to probe with")
    return [prompts[i % len(prompts)] for i in range(n)]


def parse_floats(what: str, text: str, low: float | None = None) -> list[float]:
    from erasekit.checks import finite

    values = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        try:
            v = float(part)
        except ValueError:
            raise ErasekitError(f"{what}: {part.strip()!r} is not a number (comma-separated numbers)") from None
        values.append(finite(what, v, low=low))
    if not values:
        raise ErasekitError(f"{what}: give at least one number")
    return values


def remembered(ctx: AttackContext, probe: str, key: dict, budget: dict) -> dict:
    """The budget of the first run with these inputs (``cache_dir``), marked ``reused_from_cache`` on later runs;
    a probe prepares nothing costly before generation, so only its record is kept (its images are reused from the
    image store)."""
    from erasekit.cache import cached

    saved, reused = cached(ctx.cache_dir, f"probe-{probe}", (key,), lambda: budget)
    return dict(saved, reused_from_cache=reused) if reused else saved


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 3)

"""The text scenario: prompts that name the concept.

For the embedded world, prompts come from its caption templates with every synonym of the concept, the other
attributes cycled, and the paraphrases training never saw (``EVAL_PARAPHRASES``: "a starfish", "a pentagram").
For any other model, a few generic templates around the concept word. Image i gets prompt ``i mod P`` and seed
``seed + i``. (I2P-layout CSVs: `erasekit.attacks.i2p`.)
"""

from __future__ import annotations

import time

import numpy as np

from erasekit.attacks.base import AttackInputs
from erasekit.errors import ErasekitError

GENERIC_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a painting of a {}", "{}")


def toy_concept_prompts(concept: str, seed: int = 0) -> list[str]:
    """Every way the world's captions (and the held-out paraphrases) name ``concept``, in a fixed shuffled order."""
    from erasekit.toy import world

    try:
        kind = world.concept_kind(concept)
    except ValueError as exc:
        raise ErasekitError(str(exc)) from exc
    rng = np.random.default_rng(seed)
    words = {"shape": world.SHAPE_WORDS, "color": world.COLOR_WORDS, "texture": world.TEXTURE_WORDS}[kind][concept]

    def pick(options):
        return options[rng.integers(len(options))]

    prompts = []
    for word in words:
        for template in world.FULL_TEMPLATES:
            s = word if kind == "shape" else pick(world.SHAPES)
            c = word if kind == "color" else pick(world.COLORS)
            t = word if kind == "texture" else pick(world.TEXTURES)
            prompts.append(template.format(s=s, c=c, t=t))
        for needs, template in world.PARTIAL_TEMPLATES:
            if kind[0] in needs:
                fill = {"s": word if kind == "shape" else pick(world.SHAPES),
                        "c": word if kind == "color" else pick(world.COLORS),
                        "t": word if kind == "texture" else pick(world.TEXTURES)}
                prompts.append(template.format(**fill))
    prompts.extend(world.EVAL_PARAPHRASES.get(concept, ()))
    prompts = list(dict.fromkeys(prompts))
    order = rng.permutation(len(prompts))
    return [prompts[i] for i in order]


def generic_concept_prompts(concept: str) -> list[str]:
    return [t.format(concept) for t in GENERIC_TEMPLATES]


def text_inputs(concept: str, n: int, *, toy: bool, seed: int = 0, prompts: list[str] | None = None) -> AttackInputs:
    """``n`` images over the concept's prompts (``prompts`` overrides the built-in set)."""
    t0 = time.perf_counter()
    if n < 1:
        raise ErasekitError(f"-n must be at least 1, got {n}")
    if prompts is None:
        prompts = toy_concept_prompts(concept) if toy else generic_concept_prompts(concept)
    if not prompts:
        raise ErasekitError("no prompts to attack with")
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    return AttackInputs(
        attack="text",
        prompts=chosen,
        seeds=[seed + i for i in range(n)],
        budget={"prompts": len(prompts), "images_used": 0, "optimisation_steps": 0,
                "wall_s": round(time.perf_counter() - t0, 4)},
    )

"""Diffusion completion (Lu et al.): the ORIGINAL model denoises to step k, the erased model finishes.

If the erased model only steers its conditional prediction away from the concept (avoidance), a layout the
original model started at step k is often finished into the concept; if the concept is destroyed, the erased
model cannot finish it. k = 0 is the erased model alone, k = all steps the original model alone (tests check
both). Paper: k = 5 and 10 of 50 steps; here ``k`` defaults to a fifth of the sampling steps (4 of the embedded
world's 20, as 10 of 50). Prompts: the world's prompts naming the concept (as the text scenario), so the rate is
comparable with the text scenario's on the same seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from erasekit.attacks.base import AttackContext, AttackInputs
from erasekit.errors import ErasekitError
from erasekit.probes.base import Probe, Timer, concept_prompt_list, cycle, remembered, steps_of
from erasekit.probes.sampling import ProbeGeneration, probe_key, sample
from erasekit.registry import PROBES
from erasekit.settings import Settings, choice


@dataclass
class CompletionSettings(Settings):
    k: Optional[int] = None  # steps the original model takes first (None: a fifth of the sampling steps)
    prompt_mode: str = choice("world", "world", "concept", "empty", help="world's concept prompts, plain, empty")

    def validate(self) -> None:
        if self.k is not None and self.k < 0:
            raise ErasekitError(f"completion: k must be between 0 and the sampling steps, got {self.k}")


def resolve_k(k: int | None, steps: int) -> int:
    k = max(1, steps // 5) if k is None else int(k)
    if not 0 <= k <= steps:
        raise ErasekitError(f"completion: k={k} is out of range: the original model can take 0 to {steps} of the "
                            f"{steps} sampling steps")
    return k


def completion_images(target, prompts, seeds, *, steps: int, scale: float, k: int):
    """Original model for steps 0..k, ``target`` (edits and defences) for k..steps."""
    return sample(target, prompts, seeds, steps=steps, scale=scale,
                  phases=[(target.original(), 0, k), (target, k, steps)])


@PROBES.register
class DiffusionCompletion(Probe):
    name = "completion"
    summary = "diffusion completion: the original model denoises to step k, the erased model finishes"
    needs_unet = False  # part-way runs of the family's sampler
    Settings = CompletionSettings
    scenarios = {"probe-completion": {}}

    def inputs(self, ctx: AttackContext) -> AttackInputs:
        timer = Timer()
        steps = steps_of(ctx)
        k = resolve_k(self.settings.k, steps)
        prompts = cycle(concept_prompt_list(ctx, self.settings.prompt_mode), ctx.n)
        seeds = [ctx.seed + i for i in range(ctx.n)]
        orig_id = ctx.target.original().cache_id
        key = probe_key(probe="completion", k=k, steps=steps, original=orig_id)

        def fn(target, idx, steps_, scale):
            if steps_ != steps:
                raise ErasekitError(f"completion: k={k} was resolved for {steps} steps, generation asks {steps_}")
            return completion_images(target, [prompts[i] for i in idx], [seeds[i] for i in idx], steps=steps,
                                     scale=scale, k=k)

        return AttackInputs(prompts=prompts, seeds=seeds, items=[{"probe": "completion", "k": k} for _ in prompts],
                            generate=ProbeGeneration(fn, [key] * len(prompts)), attack=self.name,
                            budget=remembered(ctx, self.name, dict(key=key, target=ctx.target.cache_id, prompts=prompts,
                                                                   seeds=seeds), {
                                "k": k, "steps": steps, "original_steps": k, "erased_steps": steps - k,
                                "unet_evaluations_per_image": steps, "optimisation_steps": 0, "images_used": 0,
                                "wall_s": timer.seconds()}))

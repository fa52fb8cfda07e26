"""Noise-based probe (Lu et al.): more stochastic DDIM sampling, best of N by the detector.

For every image, one sample per cell of the grid DDIM eta x variance scale (paper: eta in {1.0, 1.17, 1.34, 1.51,
1.68, 1.85} x scale in {1.00, 1.02, 1.03, 1.04}, 24 samples); the image kept is the one the scenario's detector
scores highest for the concept. The stochastic DDIM step is written out in an ``after`` hook so that eta > 1 works
(the deterministic direction's coefficient is clamped at 0 where sigma_t exceeds it, instead of diffusers' NaN)
and the injected noise's variance is multiplied by the scale. Grid cell j of image i draws its x_T and its step
noise from seeds derived from (seed_i, j). The budget records the samples per image.

Flow matching (SD3, FLUX.1: x_s = (1 - s) x0 + s eps) has no DDIM eta of its own; `StochasticFlow` is the same
generalised DDIM step for a marginal x = alpha x0 + sigma eps (alpha = 1 - s, sigma = s): the injected noise
c = eta (s'/s) sqrt(s^2 - (alpha/alpha')^2 s'^2) (eta = 1: the posterior of the forward chain, the DDPM step;
written with alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t) it is DDIM's sigma_t), x_next = alpha' x0 +
sqrt(max(s'^2 - c^2, 0)) eps + sqrt(scale) c z. At eta = 0 it is the sampler's deterministic Euler step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from erasekit.attacks.base import AttackContext, AttackInputs
from erasekit.diffusion.schedule import DDIMSteps
from erasekit.errors import ErasekitError
from erasekit.probes.base import Probe, Timer, concept_prompt_list, cycle, parse_floats, remembered, steps_of
from erasekit.probes.sampling import ProbeGeneration, probe_key, sample
from erasekit.registry import PROBES
from erasekit.settings import Settings, choice
from erasekit.store import content_key

PAPER_ETAS = "1.0,1.17,1.34,1.51,1.68,1.85"
PAPER_SCALES = "1.00,1.02,1.03,1.04"


@dataclass
class NoiseSettings(Settings):
    etas: str = PAPER_ETAS  # comma-separated DDIM etas
    variance_scales: str = PAPER_SCALES  # comma-separated multipliers of the injected noise's variance
    prompt_mode: str = choice("world", "world", "concept", "empty", help="world's concept prompts, plain, empty")

    def validate(self) -> None:
        parse_floats("noise: etas", self.etas, low=0.0)
        parse_floats("noise: variance_scales", self.variance_scales, low=0.0)

    def grid(self) -> list[tuple[float, float]]:
        return [(e, v) for e in parse_floats("noise: etas", self.etas, low=0.0)
                for v in parse_floats("noise: variance_scales", self.variance_scales, low=0.0)]


class StochasticDDIM:
    """``after`` hook: x_{t-1} = sqrt(a') x0 + sqrt(max(1 - a' - s^2, 0)) eps + sqrt(scale) s z, s = eta sigma_t."""

    def __init__(self, scheduler, eta: float, variance_scale: float, seeds):
        from erasekit.diffusion.sampler import seed_generators

        self.ddim, self.eta, self.scale = DDIMSteps(scheduler), float(eta), float(variance_scale)
        self.generators = seed_generators(seeds)

    def after(self, state) -> None:
        ddim = self.ddim
        a_t, a_prev = ddim.alphas(state.t)
        sigma = self.eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
        x0 = state.x0.float()
        eps = ddim.eps(state.latents.float(), x0, state.t)
        direction = (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        z = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in self.generators]).to(x0.device)
        nxt = a_prev.sqrt() * x0 + direction + (self.scale ** 0.5) * sigma * z
        state.next_latents = nxt.to(state.latents.dtype)


class StochasticFlow:
    """``after`` hook for flow-matching samplers: the generalised DDIM step above, on the flow's sigmas."""

    def __init__(self, scheduler, eta: float, variance_scale: float, seeds):
        from erasekit.diffusion.flow import FlowSteps
        from erasekit.diffusion.sampler import seed_generators

        self.steps, self.eta, self.scale = FlowSteps(scheduler), float(eta), float(variance_scale)
        self.generators = seed_generators(seeds)

    def after(self, state) -> None:
        s, s_next = (v.float() for v in self.steps.sigmas(state.t))
        a, a_next = 1 - s, 1 - s_next
        c = self.eta * (s_next / s) * (s ** 2 - (a / a_next) ** 2 * s_next ** 2).clamp(min=0).sqrt()
        x0 = state.x0.float()
        eps = self.steps.eps(state.latents.float(), x0, state.t, torch.float32)
        direction = (s_next ** 2 - c ** 2).clamp(min=0).sqrt() * eps
        z = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in self.generators]).to(x0.device)
        nxt = a_next * x0 + direction + (self.scale ** 0.5) * c * z
        state.next_latents = nxt.to(state.latents.dtype)


def stochastic_step(pipe, scheduler, eta: float, variance_scale: float, seeds):
    """The family's stochastic step hook: `StochasticDDIM`, or `StochasticFlow` on flow-matching families."""
    from erasekit.diffusion.family import family_of

    cls = StochasticFlow if family_of(pipe).flow else StochasticDDIM
    return cls(scheduler, eta, variance_scale, seeds)


def cell_seed(seed: int, j: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * j) % (2 ** 63)


def noise_candidates(target, prompts, seeds, *, steps: int, scale: float, grid) -> list[np.ndarray]:
    """One uint8 batch per grid cell."""
    from erasekit.diffusion.sampler import Sampler

    out = []
    for j, (eta, vs) in enumerate(grid):
        cell = [cell_seed(s, j) for s in seeds]
        sched = Sampler(target.pipe, steps).scheduler
        hook = stochastic_step(target.pipe, sched, eta, vs, [c + 1 for c in cell])
        out.append(sample(target, prompts, cell, steps=steps, scale=scale, hooks=[hook]))
    return out


@PROBES.register
class NoiseProbe(Probe):
    name = "noise"
    summary = "noise-based: DDIM eta x variance-scale grid, best of N samples per image by the detector"
    needs_unet = False  # the family's sampler (flow families: `StochasticFlow`)
    Settings = NoiseSettings
    scenarios = {"probe-noise": {}}

    def inputs(self, ctx: AttackContext) -> AttackInputs:
        timer = Timer()
        grid = self.settings.grid()
        detector = ctx.detector if ctx.detector is not None else ctx.target.world.detector(ctx.concept)
        steps = steps_of(ctx)
        prompts = cycle(concept_prompt_list(ctx, self.settings.prompt_mode), ctx.n)
        seeds = [ctx.seed + i for i in range(ctx.n)]
        key = probe_key(probe="noise", grid=grid, detector=content_key(detector.info()))
        chosen: dict[int, int] = {}

        def fn(target, idx, steps_, scale):
            cands = noise_candidates(target, [prompts[i] for i in idx], [seeds[i] for i in idx], steps=steps_,
                                     scale=scale, grid=grid)
            scores = np.array([[r["score"] for r in detector.score(c)] for c in cands])  # (cells, B)
            best = scores.argmax(0)
            for b, i in enumerate(idx):
                chosen[i] = int(best[b])
            return np.stack([cands[best[b]][b] for b in range(len(idx))])

        if not grid:
            raise ErasekitError("noise: empty grid")
        return AttackInputs(prompts=prompts, seeds=seeds, items=[{"probe": "noise"} for _ in prompts],
                            generate=ProbeGeneration(fn, [key] * len(prompts)), attack=self.name,
                            budget=remembered(ctx, self.name, dict(key=key, target=ctx.target.cache_id,
                                                                   prompts=prompts, seeds=seeds), {
                                "grid": [list(c) for c in grid], "samples_per_image": len(grid),
                                "unet_evaluations_per_image": len(grid) * steps, "optimisation_steps": 0,
                                "images_used": 0, "detector": detector.info().get("name"),
                                "wall_s": timer.seconds()}))

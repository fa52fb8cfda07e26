"""SLD, Safe Latent Diffusion (Schramowski et al., CVPR 2023): a third branch on a safety concept's text pushes
classifier-free guidance away from that concept where the prompt's prediction is close to it.

The math is diffusers' ``StableDiffusionPipelineSafe`` (equations 3-8 of the paper), per step i, with u, c, s the
unconditional, prompt and safety-concept predictions and g the guidance scale::

    scale    = clamp(|c - s| * sld_scale, max=1)
    scale_s  = where(c - s >= threshold, 0, scale)
    g_s      = (s - u) * scale_s + momentum_scale * v          v: the momentum, zero at the first step
    v        = momentum_beta * v + (1 - momentum_beta) * g_s
    output   = u + g ((c - u) - g_s)   if i >= warmup_steps    else u + g (c - u)

As in diffusers, SLD acts only with classifier-free guidance (scale > 1) and ``sld_scale > 1``; the momentum
accumulates from the first step, also during warm-up. Presets (warm-up / sld_scale / threshold / momentum scale /
momentum beta; the warm-up counts steps of the sampler, the paper's are of 50 steps): WEAK 15/20/0/0/0, MEDIUM
10/1000/0.01/0.3/0.4 (diffusers' defaults), STRONG 7/2000/0.025/0.5/0.7, MAX 0/5000/1/0.5/0.7. Any number may be
overridden: ``--defence sld:concept=nudity,preset=strong,warmup_steps=3``. Cost: one more UNet branch (1.5x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erasekit.checks import finite, integer, probability
from erasekit.defences.base import Defence
from erasekit.errors import ErasekitError
from erasekit.registry import DEFENCES
from erasekit.settings import Settings, choice

# warmup_steps, sld_scale, threshold, momentum_scale, momentum_beta
PRESETS = {
    "weak": (15, 20.0, 0.0, 0.0, 0.0),
    "medium": (10, 1000.0, 0.01, 0.3, 0.4),
    "strong": (7, 2000.0, 0.025, 0.5, 0.7),
    "max": (0, 5000.0, 1.0, 0.5, 0.7),
}
NUMBERS = ("warmup_steps", "sld_scale", "threshold", "momentum_scale", "momentum_beta")


@dataclass
class SLDSettings(Settings):
    concept: str = ""  # the safety concept's text (the paper's default for nudity is a long list of words)
    preset: str = choice("medium", "weak", "medium", "strong", "max", help="SLD's named configurations")
    warmup_steps: int | None = None  # overrides of the preset's numbers (None: the preset's)
    sld_scale: float | None = None
    threshold: float | None = None
    momentum_scale: float | None = None
    momentum_beta: float | None = None

    def validate(self) -> None:
        if not self.concept.strip():
            raise ErasekitError("sld needs its safety concept: --defence sld:concept=<concept>")
        if self.warmup_steps is not None:
            integer("setting warmup_steps", self.warmup_steps, low=0)
        if self.sld_scale is not None:
            finite("setting sld_scale", self.sld_scale, low=0)
        if self.threshold is not None:
            finite("setting threshold", self.threshold)
        if self.momentum_scale is not None:
            finite("setting momentum_scale", self.momentum_scale, low=0)
        if self.momentum_beta is not None:
            probability("setting momentum_beta", self.momentum_beta)

    def resolved(self) -> dict:
        """The numbers in force: the preset's, with the overrides."""
        base = dict(zip(NUMBERS, PRESETS[self.preset]))
        return {k: base[k] if getattr(self, k) is None else getattr(self, k) for k in NUMBERS}


class SafeLatentGuidance:
    """Wraps a guidance with ``uncond`` and ``cond`` branches (classifier-free guidance, possibly itself wrapped by
    another defence); one batched UNet call evaluates its branches and the safety branch. Holds the momentum of
    one batch (a new wrapper per batch)."""

    def __init__(self, inner, safety, numbers: dict, unet=None, family=None):
        self.inner = inner
        self.unet, self.family = unet, family
        self.safety = safety  # Conditioning of the safety concept (1 item)
        self.n = numbers
        self.momentum: torch.Tensor | None = None
        self.calls = 0

    @property
    def branches(self):
        return dict(self.inner.branches, safety=self.safety)

    @property
    def evaluations(self) -> int:
        return self.inner.evaluations

    @property
    def scale(self):
        return self.inner.scale

    def select(self, index) -> "SafeLatentGuidance":
        """The same for a sub-batch (or, with ``slice(None)``, a copy), with its own fresh momentum."""
        return SafeLatentGuidance(self.inner.select(index), self.safety, self.n, self.unet, self.family)

    def __call__(self, x, t, state=None):
        from erasekit.diffusion.conditioning import Conditioning

        inner = self.inner
        b = len(x)
        if hasattr(inner, "model") and hasattr(inner, "combine"):  # a plain Guidance: one batched call
            names = list(inner.branches) + ["safety"]
            branches = self.branches
            cond = Conditioning.cat([branches[k].expand(b) for k in names])
            out = dict(zip(names, inner.model(torch.cat([x] * len(names)), t, cond).chunk(len(names))))
            inner.evaluations += len(names)
            if state is not None:
                state.branches = out
            guided = inner.combine({k: v for k, v in out.items() if k != "safety"}, state)
        else:  # another defence's wrapper: its output, its branches, and the safety branch beside it
            from erasekit.diffusion.guidance import UNetDenoiser
            from erasekit.diffusion.sampler import StepState

            state = state if state is not None else StepState(self.calls, 0, t, x)
            guided = inner(x, t, state)
            out = dict(state.branches)
            out["safety"] = UNetDenoiser(self.unet, self.family)(x, t, self.safety.expand(b))
            state.branches = out
        step = state.index if state is not None else self.calls
        self.calls += 1
        u, c, s = out["uncond"], out["cond"], out["safety"]
        n = self.n
        if self.momentum is None:
            self.momentum = torch.zeros_like(c)
        diff = c - s
        scale = torch.clamp(diff.abs() * n["sld_scale"], max=1.0)
        scale = torch.where(diff >= n["threshold"], torch.zeros_like(scale), scale)
        g_s = (s - u) * scale + n["momentum_scale"] * self.momentum
        self.momentum = n["momentum_beta"] * self.momentum + (1 - n["momentum_beta"]) * g_s
        if step >= n["warmup_steps"]:
            guided = guided - inner.scale * g_s
        return guided


@DEFENCES.register
class SLD(Defence):
    needs_unet = False  # the family's denoiser only: SD3 and FLUX.1 too
    name = "sld"
    summary = "Safe Latent Diffusion: a safety-concept branch steers guidance away (presets weak/medium/strong/max)"
    Settings = SLDSettings

    def record(self) -> dict:
        rec = super().record()
        rec["resolved"] = self.settings.resolved()
        return rec

    def wrap(self, guidance, ctx):
        numbers = self.settings.resolved()
        scale = getattr(guidance, "scale", None)
        branches = getattr(guidance, "branches", {})
        if scale is None or "uncond" not in branches or "cond" not in branches or not numbers["sld_scale"] > 1.0:
            return guidance  # no classifier-free guidance (scale <= 1) or sld_scale <= 1: diffusers disables SLD
        pipe = ctx.target.pipe
        from erasekit.diffusion.speed import unet_for

        model = unet_for(pipe)  # the compiled UNet in fast mode (the safety branch beside another wrapper)
        safety = ctx.target.family.encode(pipe, [self.settings.concept], device=model.device)
        return SafeLatentGuidance(guidance, safety, numbers, model, ctx.target.family)

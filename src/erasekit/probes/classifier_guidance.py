"""Classifier guidance (Lu et al.): sampling pushed towards the concept by a differentiable concept classifier.

The classifier is the scenario's detector on decoded images (the embedded world's CNN; a detector that offers no
gradient is refused with a clear error). At each of the first ``until`` share of the steps, an ``after`` hook takes
the predicted clean latents x0, decodes them through the VAE, and moves x0 along the normalised gradient of
log p(concept | decode(x0)): x0 <- x0 + scale * g / rms(g); DDIM's update is then recomputed from the new x0.
(Lu et al. train a classifier on noisy latents and add its gradient to the noise prediction; with the detector
itself and the gradient taken at x0 the probe needs no training, but the judge is then the guide: the late steps
without guidance (1 - ``until``) make the model, not the gradient, finish the image.) ``eta`` > 0 gives their
"classifier guidance + noise" variant.

Defaults (measured on the embedded world, concept star, 32 images per setting): the empty prompt, so the probe asks
whether the unconditional model can still be steered to the concept (Lu et al. guide unconditional sampling), scale
2 for the first 60% of the steps: UCE-erased 97%, original 94%. With the erased concept prompts at scale <= 1 it
stays at the text rate (3-9%); at scale 4 with every step guided the "stars" it makes are detector-fooling noise,
not shapes (so the late steps stay unguided).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erasekit.attacks.base import AttackContext, AttackInputs
from erasekit.checks import finite
from erasekit.errors import ErasekitError
from erasekit.probes.base import Probe, Timer, concept_prompt_list, cycle, remembered, steps_of
from erasekit.probes.sampling import ProbeGeneration, probe_key, sample
from erasekit.registry import PROBES
from erasekit.settings import Settings, choice
from erasekit.store import content_key


@dataclass
class ClassifierGuidanceSettings(Settings):
    scale: float = 2.0  # step along the normalised gradient, in latent units per step
    until: float = 0.6  # share of the steps (from the first) that are guided
    eta: float = 0.0  # DDIM eta of the sampling (> 0: classifier guidance + noise)
    prompt_mode: str = choice("empty", "empty", "world", "concept", help="empty (the unconditional model), world's, plain")

    def validate(self) -> None:
        finite("classifier_guidance: scale", self.scale, low=0.0)
        finite("classifier_guidance: until", self.until, low=0.0, high=1.0)
        finite("classifier_guidance: eta", self.eta, low=0.0, high=1.0)


def log_prob_fn(detector):
    """A differentiable log p(concept | images in [0, 1], (N, 3, H, W)): the detector's ``concept_log_prob``."""
    fn = getattr(detector, "concept_log_prob", None)
    if fn is None:
        raise ErasekitError(f"classifier guidance needs a differentiable concept classifier; the detector "
                            f"{getattr(detector, 'name', type(detector).__name__)!r} offers none (use the toy detector)")
    return fn


class ClassifierGuidanceHook:
    def __init__(self, pipe, log_prob, scale: float, until: float):
        self.pipe, self.log_prob, self.scale, self.until = pipe, log_prob, float(scale), float(until)
        self.evaluations = 0

    def after(self, state) -> None:
        if self.scale == 0 or state.index >= self.until * state.n_steps:
            return
        vae = self.pipe.vae
        with torch.inference_mode(False), torch.enable_grad():
            x0 = state.x0.detach().clone().float().requires_grad_(True)
            z = x0 / vae.config.scaling_factor
            if getattr(vae.config, "shift_factor", None) is not None:  # SD3 / FLUX VAEs: z / scale + shift
                z = z + vae.config.shift_factor
            images = vae.decode(z.to(vae.dtype)).sample.float()
            lp = self.log_prob((images / 2 + 0.5).clamp(0, 1)).sum()
            (g,) = torch.autograd.grad(lp, x0)
        self.evaluations += 1
        rms = g.pow(2).mean(dim=tuple(range(1, g.ndim)), keepdim=True).sqrt().clamp(min=1e-12)
        state.x0 = (x0.detach() + self.scale * g / rms).to(state.x0.dtype)
        state.next_latents = None


@PROBES.register
class ClassifierGuidance(Probe):
    name = "classifier_guidance"
    alias = "cg"
    summary = "classifier guidance: gradient of the detector's log p(concept) on decoded x0 added to each update"
    needs_unet = False  # x0 through the family's sampler and VAE (SD3 / FLUX.1: the VAE's shift too)
    Settings = ClassifierGuidanceSettings
    scenarios = {"probe-classifier-guidance": {}}

    def inputs(self, ctx: AttackContext) -> AttackInputs:
        timer = Timer()
        s = self.settings
        detector = ctx.detector if ctx.detector is not None else ctx.target.world.detector(ctx.concept)
        log_prob = log_prob_fn(detector)
        steps = steps_of(ctx)
        prompts = cycle(concept_prompt_list(ctx, s.prompt_mode), ctx.n)
        seeds = [ctx.seed + i for i in range(ctx.n)]
        key = probe_key(probe="classifier_guidance", scale=s.scale, until=s.until, eta=s.eta,
                        detector=content_key(detector.info()))

        def fn(target, idx, steps_, scale):
            hook = ClassifierGuidanceHook(target.pipe, log_prob, s.scale, s.until)
            hooks = [hook]
            if s.eta > 0:
                from erasekit.diffusion.sampler import Sampler
                from erasekit.probes.noise import stochastic_step

                hooks.append(stochastic_step(target.pipe, Sampler(target.pipe, steps_).scheduler, s.eta, 1.0,
                                             [seeds[i] + 1 for i in idx]))
            return sample(target, [prompts[i] for i in idx], [seeds[i] for i in idx], steps=steps_, scale=scale,
                          hooks=hooks)

        return AttackInputs(prompts=prompts, seeds=seeds, items=[{"probe": "classifier_guidance"} for _ in prompts],
                            generate=ProbeGeneration(fn, [key] * len(prompts)), attack=self.name,
                            budget=remembered(ctx, self.name, dict(key=key, target=ctx.target.cache_id,
                                                                   prompts=prompts, seeds=seeds), {
                                "guided_steps": int(sum(i < s.until * steps for i in range(steps))),
                                "scale": s.scale, "eta": s.eta, "optimisation_steps": 0, "images_used": 0,
                                "wall_s": timer.seconds()}))

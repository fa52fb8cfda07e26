"""The sampling loop, in named steps, with hooks at every step.

    sampler = Sampler(pipe, steps=20)
    z = sampler.prepare_latents(seeds)               # one generator per image: images do not depend on batching
    z = sampler.denoise(z, guidance, hooks=[...])    # DDIM or flow Euler; hooks read and replace latents, model output, x0
    images = sampler.decode(z)                       # uint8 (N, H, W, 3)

`denoise(start=k)` starts part-way (diffusion completion), `stop=k` ends early; `invert` runs the same loop
backwards with DDIM's inverse scheduler. The loop is the one of diffusers' `StableDiffusionPipeline` (same batching,
same scheduler calls), so with no hooks it gives that pipeline's images.

A hook is any object with some of ``before(state)``, ``on_output(state)``, ``after(state)``:

- ``before``: ``state.latents`` (x_t) may be replaced before the model sees it;
- ``on_output``: ``state.output`` (the guided model output) may be replaced; ``state.branches`` holds each
  branch's output (uncond, cond, ...);
- ``after``: ``state.x0`` (the predicted clean latents) and ``state.next_latents`` are set; ``next_latents`` may be
  replaced, and a hook that changes ``state.x0`` sets ``state.next_latents = None`` to have it recomputed from
  the new x0 (DDIM's update rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch


@dataclass
class StepState:
    index: int  # 0 .. n_steps-1 in the loop's own order
    n_steps: int
    t: torch.Tensor
    latents: torch.Tensor
    output: torch.Tensor | None = None
    branches: dict[str, torch.Tensor] = field(default_factory=dict)
    x0: torch.Tensor | None = None
    next_latents: torch.Tensor | None = None


class StepHook:
    """Base class with no-op hooks (subclassing is optional: any object with these methods works)."""

    def before(self, state: StepState) -> None: ...

    def on_output(self, state: StepState) -> None: ...

    def after(self, state: StepState) -> None: ...


def _call(hooks, name: str, state: StepState) -> None:
    for hook in hooks:
        fn = getattr(hook, name, None)
        if fn is not None:
            fn(state)


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def to_uint8(images: np.ndarray) -> np.ndarray:
    # The same rounding as diffusers' numpy_to_pil.
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


class Sampler:
    """Sampling of ``pipe`` with ``steps`` steps through its family's scheduler (DDIM for SD-1.x/2.x/XL; the
    pipeline's flow-matching Euler scheduler for SD3 / FLUX.1); eta: DDIM's stochasticity, 0 = deterministic."""

    def __init__(self, pipe, steps: int, eta: float = 0.0):
        from erasekit.diffusion.family import family_of

        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        self.pipe = pipe
        self.steps = int(steps)
        self.eta = float(eta)
        self.family = family_of(pipe)
        # A private scheduler: set_timesteps mutates it, and hooks may run other samplers inside a step.
        self.scheduler = self.family.sampling_scheduler(pipe)
        self.scheduler_name = type(self.scheduler).__name__  # recorded with every image
        self._latent_hw = None
        h, w = self.family.image_size(pipe)
        self.latent_shape(h, w)  # checks the native size fits
        self.set_size(h, w)
        # x0/eps updates for hooks (`DDIMSteps`, or `FlowSteps` for flow matching).
        self.ddim = self.family.steps_rule(self.scheduler)

    def set_size(self, height: int, width: int) -> None:
        """Timesteps for images of this size (FLUX.1's and SD3.5's schedules shift with the image size)."""
        _, h, w = self.latent_shape(height, width)
        self._set_latent_hw((h, w))

    def _set_latent_hw(self, hw) -> None:
        first, hw = self._latent_hw is None, tuple(int(v) for v in hw)
        if self._latent_hw == hw or not (first or self.family.flow):  # DDIM's timesteps ignore the size
            return
        self._latent_hw = hw
        self.family.set_timesteps(self.pipe, self.scheduler, self.steps, self._latent_hw)
        self.timesteps = self.scheduler.timesteps

    # -- named steps ----------------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.family.latent_shape(self.pipe, height, width)

    def draw_noise(self, generators, height: int, width: int) -> torch.Tensor:
        """Float32 CPU standard-normal latents, one draw per generator (unscaled), drawn in the denoiser's dtype as
        diffusers' pipelines draw them: torch 2.11's CPU ``randn`` in bf16 / fp16 gives other numbers than its float32
        draw cast down (torch 2.13: the same), so a float32 draw would part from diffusers' images on half weights."""
        shape = self.latent_shape(height, width)
        dtype = self.family.denoiser(self.pipe).dtype
        dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32  # fp8 storage: a float32 draw
        return torch.stack([torch.randn(shape, generator=g, dtype=dtype).float() for g in generators])

    def prepare_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """Initial x_T from standard-normal noise, on the denoiser's device and dtype."""
        model = self.family.denoiser(self.pipe)
        return noise.to(model.device, model.dtype) * self.family.init_noise_sigma(self.scheduler)

    def denoise(self, latents: torch.Tensor, guidance, hooks: Sequence = (), generators=None, start: int = 0,
                stop: int | None = None) -> torch.Tensor:
        """Run steps ``start`` .. ``stop`` (default: all) of the loop from ``latents`` (x at step ``start``)."""
        self._set_latent_hw(latents.shape[-2:])
        stop = len(self.timesteps) if stop is None else stop
        if not 0 <= start <= stop <= len(self.timesteps):
            raise ValueError(f"need 0 <= start <= stop <= {len(self.timesteps)}, got {start}, {stop}")
        family, scheduler = self.family, self.scheduler
        for i in range(start, stop):
            t = self.timesteps[i]
            state = StepState(i, len(self.timesteps), t, latents)
            _call(hooks, "before", state)
            x_in = family.model_input(scheduler, state.latents, t)
            state.output = guidance(x_in, t, state)
            _call(hooks, "on_output", state)
            state.x0, state.next_latents = family.step(scheduler, i, state.output, t, state.latents, self.eta,
                                                       generators)
            _call(hooks, "after", state)
            if state.next_latents is None:  # a hook replaced x0: step again from it
                state.next_latents = self.step_from_x0(state)
            latents = state.next_latents
        return latents

    def step_from_x0(self, state: StepState) -> torch.Tensor:
        """Deterministic update x_t -> x_{t-1} from (possibly edited) x0 and the implied noise (DDIM's, or the
        flow-matching interpolation x = (1 - s) x0 + s eps at the next sigma)."""
        return self.ddim.step(state.x0, self.ddim.eps(state.latents, state.x0, state.t), state.t)

    def invert(self, latents: torch.Tensor, guidance, hooks: Sequence = (), refine: int = 0) -> torch.Tensor:
        """Inversion: clean scaled latents -> the x_T that `denoise` maps back to them (DDIM inversion; Euler
        flow-matching inversion for SD3 / FLUX.1: the family's `inversion_steps`).

        ``refine`` > 0 makes each step implicit (a fixed point of the forward step; ``refine`` extra evaluations).
        """
        inverse = self.family.inversion_scheduler(self.pipe)
        steps = self.family.inversion_steps(self.pipe, inverse, self.steps, tuple(latents.shape[-2:]))
        z = latents
        for i, (t, step) in enumerate(steps):
            state = StepState(i, len(steps), t, z)
            _call(hooks, "before", state)
            nxt = step(guidance(state.latents, t, state), state.latents)
            for _ in range(refine):  # the forward step from nxt evaluates the model at nxt: solve for that nxt
                nxt = step(guidance(nxt, t), state.latents)
            z = nxt
        return z

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        from erasekit.diffusion.vae import decode_latents

        return decode_latents(self.pipe, latents)

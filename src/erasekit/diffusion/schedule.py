"""The forward process of a model and what its network predicts, in one place.

Every user that noises latents, builds a training target, or turns a model output into the clean-latent estimate
x0 and the noise eps (the sampler's x0-edited steps, IRECE, the noise probe, textual inversion, ESD's and the
attacks' denoising losses, the likelihood measure) asks a `NoiseSchedule` instead of re-deriving the formulas from
``alphas_cumprod`` and ``prediction_type``. A model family returns the schedule of its pipelines
(`erasekit.diffusion.family`): the variance-preserving DDPM schedule of SD-1.x/2.x/XL today,

    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps,   output = eps (epsilon) | sqrt(a_t) eps - sqrt(1 - a_t) x0 (v),

and a flow-matching family would return its own (x_t = (1 - s) x0 + s eps, output = eps - x0) with the same methods.
The arithmetic is diffusers' (`DDPMScheduler.add_noise` / `get_velocity`, DDIM's update), so results are unchanged.
"""

from __future__ import annotations

import torch


class NoiseSchedule:
    """Variance-preserving (DDPM) schedule of a diffusers scheduler config, with the model's prediction type."""

    def __init__(self, config):
        from diffusers import DDPMScheduler

        self._ddpm = DDPMScheduler.from_config(config)
        self.prediction_type = str(self._ddpm.config.prediction_type)
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction type {self.prediction_type!r}")
        self.num_train_timesteps = int(self._ddpm.config.num_train_timesteps)
        self.alphas_cumprod = self._ddpm.alphas_cumprod

    # -- the forward process -------------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._ddpm.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's regression target for x_t = add_noise(x0, noise, t)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self._ddpm.get_velocity(x0, noise, t)
        return x0


class DDIMSteps:
    """The deterministic DDIM update between a sampler's own timesteps, for hooks that rebuild a step from an
    edited x0 or eps (the sampler, IRECE, the noise probe): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""

    def __init__(self, scheduler):
        self.scheduler = scheduler  # a DDIMScheduler with its timesteps set

    def alphas(self, t, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, a_prev) of the step from ``t``; a_prev is DDIM's final alpha past the last step."""
        s = self.scheduler
        t = int(t)
        prev_t = t - s.config.num_train_timesteps // s.num_inference_steps
        a_t = s.alphas_cumprod[t]
        a_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
        if dtype is not None:
            a_t, a_prev = a_t.to(dtype), a_prev.to(dtype)
        return a_t, a_prev

    def eps(self, x_t: torch.Tensor, x0: torch.Tensor, t, dtype=None) -> torch.Tensor:
        a_t, _ = self.alphas(t, dtype)
        return (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()

    def step(self, x0: torch.Tensor, eps: torch.Tensor, t, dtype=None) -> torch.Tensor:
        _, a_prev = self.alphas(t, dtype)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

"""Sampling for probes: the core's named steps with extra hooks, part-way runs and model switches.

`sample` makes the same images as `erasekit.generation.generate` (same conditioning, guidance, defences, one
generator per image, DDIM) when given no hook and the whole step range: tests check this. Probes add to it:

- ``hooks``: step hooks of the probe (inpainting's blend, classifier guidance, noise scaling), after the
  target's defences' hooks;
- ``phases``: [(target, start, stop), ...]: each part of the loop under its own target (diffusion completion:
  the original model for steps 0..k, the erased one after), one after the other on the same latents.

`ProbeGeneration` is the `GenerationInputs.generate` override a probe hands to the scenario runner: a callable
over item indices with one key string per item (what it adds that changes pixels, part of each image's key).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from erasekit.diffusion.sampler import Sampler, seed_generators
from erasekit.store import content_key


def sample(target, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, scale: float, hooks=(),
           phases: Sequence[tuple] | None = None, latents: torch.Tensor | None = None, eta: float = 0.0,
           decode: bool = True, embeds: torch.Tensor | None = None):
    """One batch: uint8 images (or final latents with ``decode=False``).

    ``latents``: initial x_T (unscaled standard-normal, as `Sampler.draw_noise` gives) instead of the seeded draw.
    ``phases``: [(target, start, stop)] in order (default: [(target, 0, steps)]).
    """
    from erasekit.diffusion.vae import image_size
    from erasekit.generation import build_guidance

    pipe = target.pipe
    seeds = [int(s) for s in seeds]
    sampler = Sampler(pipe, int(steps), eta)
    generators = seed_generators(seeds)
    h, w = image_size(pipe)
    noise = sampler.draw_noise(generators, h, w) if latents is None else latents
    phases = list(phases) if phases is not None else [(target, 0, sampler.steps)]
    with torch.no_grad():
        z = sampler.prepare_latents(noise)
        for phase_target, start, stop in phases:
            with phase_target.active():
                # conditioning, guidance and defences exactly as generation builds them (no negative prompt)
                guidance, defence_hooks = build_guidance(phase_target, sampler, list(prompts), embeds, None, scale, seeds)
                z = sampler.denoise(z, guidance, list(defence_hooks) + list(hooks), generators=generators,
                                    start=start, stop=stop)
        if not decode:
            return z
        with target.active():
            return sampler.decode(z)


def probe_key(**fields) -> str:
    """What a probe adds to each image's key (`ProbeGeneration.keys`)."""
    return content_key(fields)


class ProbeGeneration:
    """`GenerationInputs.generate` for a probe: ``fn(target, indices, steps, guidance) -> uint8 images``."""

    def __init__(self, fn: Callable, keys: list[str]):
        self.fn = fn
        self.keys = keys

    def __call__(self, target, indices, *, steps: int, guidance: float, batch_size: int) -> np.ndarray:
        out = []
        indices = list(indices)
        for start in range(0, len(indices), batch_size):
            out.append(self.fn(target, indices[start : start + batch_size], steps, guidance))
        return np.concatenate(out) if out else np.empty((0,), np.uint8)


def centre_mask(size: tuple[int, int], mask_size: int) -> np.ndarray:
    """Bool (H, W): True inside the centred ``mask_size`` x ``mask_size`` square (the region to fill)."""
    h, w = size
    m = np.zeros((h, w), bool)
    top, left = (h - mask_size) // 2, (w - mask_size) // 2
    m[top : top + mask_size, left : left + mask_size] = True
    return m


def latent_mask(pixel_mask: np.ndarray, factor: int) -> torch.Tensor:
    """(1, 1, h, w) float mask of latent cells touching a masked pixel (1 = fill, 0 = keep)."""
    h, w = pixel_mask.shape
    cells = pixel_mask.reshape(h // factor, factor, w // factor, factor).any(axis=(1, 3))
    return torch.from_numpy(cells.astype(np.float32))[None, None]

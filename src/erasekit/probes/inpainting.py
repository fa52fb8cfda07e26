"""Inpainting (Lu et al.): the erased model fills a centre mask on an image of the concept.

At every step the known (unmasked) region of the latents is replaced by the source image's latents noised to that
step's level (a ``before`` step hook; RePaint's blend without resampling), so the erased model only draws the
masked centre, in the context of the concept it is supposed to have lost. After the last step the known region is
the source's latents exactly, and after decoding the known pixels are pasted back (``paste``), so the unmasked
region of the result is the source image's (tests check this). Sources: the world's rendered concept images (or
``--images``). Prompt: the concept's plain prompt (``prompt_mode``: concept, empty).

The mask's side defaults to 3/8 of the image's (12 px of the embedded world's 32; its latent cells touching the
mask are regenerated, 16 px): measured on star with 32 images, a 16 px mask hides the whole shape (the probe is
then the text prompt again: UCE 6%, original 97%), an 8 px mask leaves so much of it that any fill is scored a
star (97% on UCE and on the original with the empty prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from erasekit.attacks.base import AttackContext, AttackInputs
from erasekit.errors import ErasekitError
from erasekit.probes.base import Probe, Timer, concept_prompt_list, remembered, steps_of
from erasekit.probes.sampling import ProbeGeneration, centre_mask, latent_mask, probe_key, sample
from erasekit.registry import PROBES
from erasekit.settings import Settings, choice

RENDER_SEED = 900_000  # rendered sources, apart from other attacks' renders


@dataclass
class InpaintingSettings(Settings):
    mask_size: Optional[int] = None  # side of the centred square to fill, in pixels (None: 3/8 of the image side)
    prompt_mode: str = choice("concept", "concept", "empty", "world", help="the concept's prompt, empty, world's")
    paste: bool = True  # paste the known pixels back after decoding

    def validate(self) -> None:
        if self.mask_size is not None and self.mask_size < 1:
            raise ErasekitError(f"inpainting: mask_size must be at least 1 pixel, got {self.mask_size}")


def resolve_mask(pipe, mask_size: int | None) -> np.ndarray:
    from erasekit.diffusion.vae import image_size

    h, w = image_size(pipe)
    f = pipe.vae_scale_factor
    size = mask_size if mask_size is not None else max(f, round(3 * min(h, w) / 8 / f) * f)
    if size > min(h, w):
        raise ErasekitError(f"inpainting: the mask ({size}x{size} px) is larger than the {w}x{h} image")
    return centre_mask((h, w), int(size))


class InpaintBlend:
    """``before`` hook: known region <- the source latents noised to the current step's level."""

    def __init__(self, pipe, source: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor):
        from erasekit.diffusion.family import family_of

        self.schedule = family_of(pipe).schedule(pipe)
        self.source, self.mask, self.noise = source, mask, noise

    def before(self, state) -> None:
        z = state.latents
        known = self.schedule.add_noise(self.source.to(z), self.noise.to(z), state.t.reshape(1).to(z.device))
        m = self.mask.to(z)
        state.latents = m * z + (1 - m) * known


def inpaint(target, sources: np.ndarray, prompts, seeds, *, steps: int, scale: float, pixel_mask: np.ndarray,
            paste: bool = True) -> np.ndarray:
    """The target fills ``pixel_mask`` (True = fill) of uint8 ``sources``; returns uint8 images."""
    from erasekit.diffusion.sampler import seed_generators
    from erasekit.diffusion.vae import decode_latents, encode_images

    pipe = target.pipe
    device = target.family.denoiser(pipe).device
    z0 = encode_images(pipe, sources).to(device)
    m = latent_mask(pixel_mask, pipe.vae_scale_factor).to(device)
    gens = seed_generators([int(s) + 1_000_003 for s in seeds])  # the known region's noise, apart from x_T's
    noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in gens]).to(device)
    z = sample(target, prompts, seeds, steps=steps, scale=scale, hooks=[InpaintBlend(pipe, z0, m, noise)],
               decode=False)
    z = m.to(z) * z + (1 - m.to(z)) * z0.to(z)
    with target.active():
        images = decode_latents(pipe, z)
    if paste:
        keep = ~pixel_mask
        images[:, keep] = sources[:, keep]
    return images


@PROBES.register
class Inpainting(Probe):
    name = "inpainting"
    summary = "inpainting: the erased model fills a centre mask of a concept image (known region blended each step)"
    needs_unet = False  # the family's schedule noises the known region (flow: (1 - s) x0 + s eps)
    Settings = InpaintingSettings
    scenarios = {"probe-inpainting": {}}

    def inputs(self, ctx: AttackContext) -> AttackInputs:
        from erasekit.attacks.images import concept_images

        timer = Timer()
        s = self.settings
        steps = steps_of(ctx)
        pixel_mask = resolve_mask(ctx.target.pipe, s.mask_size)
        images = concept_images(ctx.original, ctx.concept, ctx.n, ctx.images_folder, RENDER_SEED, ctx.notes)
        n = len(images.images)
        if n < ctx.n:
            ctx.notes.append(f"inpainting makes one image per concept image: n = {n} instead of {ctx.n}")
        base = concept_prompt_list(ctx, s.prompt_mode)
        prompts = [base[i % len(base)] for i in range(n)]
        seeds = [ctx.seed + i for i in range(n)]
        from erasekit.attacks.images import images_digest

        keys = [probe_key(probe="inpainting", source=images_digest(images.images[i : i + 1]), mask=int(pixel_mask.sum()),
                          mask_side=int(pixel_mask.any(0).sum()), paste=s.paste) for i in range(n)]

        def fn(target, idx, steps_, scale):
            return inpaint(target, images.images[idx], [prompts[i] for i in idx], [seeds[i] for i in idx],
                           steps=steps_, scale=scale, pixel_mask=pixel_mask, paste=s.paste)

        items = []
        for i in range(n):
            item = {"probe": "inpainting", "source": images.names[i]}
            if images.truth is not None:
                item["source_truth"] = images.truth[i]
            items.append(item)
        return AttackInputs(prompts=prompts, seeds=seeds, items=items, generate=ProbeGeneration(fn, keys),
                            attack=self.name,
                            budget=remembered(ctx, self.name, dict(keys=keys, target=ctx.target.cache_id,
                                                                   prompts=prompts, seeds=seeds),
                                              {"steps": steps, "mask_px": int(pixel_mask.any(0).sum()),
                                               "images_used": n, "optimisation_steps": 0,
                                               "wall_s": timer.seconds()}))

"""DDIM inversion: from concept images back to the initial noise that regenerates them.

Images are VAE-encoded (posterior mean, times the VAE scaling factor) and run backwards through the sampler
(`Sampler.invert`: DDIM's inverse scheduler, built from the pipeline's own scheduler config so that its timesteps
mirror the forward sampler's) under a prompt (default the empty prompt) and a guidance scale (default 1: no
classifier-free guidance, the most exact). Regenerating from the inverted latents with the same model, prompt and
number of steps gives the image back, up to the inversion's discretisation error.

``refine`` > 0 makes each step implicit (a fixed point of the forward step, ``refine`` extra UNet evaluations per
step): exact up to convergence. Plain DDIM inversion (refine 0) is what the M-ErasureBench scenarios use.

Scenarios: latent-bb inverts through the ORIGINAL model and regenerates with the target; latent-wb does both with
the target. Regeneration uses the empty prompt (``prompt_mode=empty``, the hardest case) or the concept's prompt.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from erasekit.attacks.base import Attack, AttackContext, AttackInputs
from erasekit.diffusion.vae import encode_images  # noqa: F401  (part of this module's API)
from erasekit.errors import ErasekitError
from erasekit.registry import ATTACKS
from erasekit.settings import Settings, choice

log = logging.getLogger(__name__)
RENDER_SEED = 2_000_000  # rendered concept images: far from generation seeds


@dataclass
class DDIMInversionSettings(Settings):
    prompt_mode: str = choice("empty", "empty", "concept", help="regenerate with the empty prompt or the concept's")
    steps: int = 0  # inversion (and regeneration) steps; 0: the sampling steps
    guidance: float = 1.0  # inversion guidance scale
    prompt: str = ""  # inversion prompt
    refine: int = 0  # fixed-point refinements per step

    def validate(self) -> None:
        from erasekit.settings import positive

        positive(self, "steps", "refine", allow_zero=True)
        positive(self, "guidance")


def ddim_invert(target, latents: torch.Tensor, prompt: str = "", steps: int | None = None, guidance: float = 1.0,
                refine: int = 0, batch_size: int = 32, progress: bool = True, fast: bool = False) -> torch.Tensor:
    """Inverted (noise) latents, float32 CPU (N, C, h, w), of clean scaled latents, through ``target``.
    ``fast``: the compiled channels-last UNet (`erasekit.diffusion.speed`)."""
    from tqdm.auto import tqdm

    from erasekit.diffusion.guidance import UNetDenoiser, guided
    from erasekit.diffusion.sampler import Sampler
    from erasekit.diffusion.target import as_target

    target = as_target(target)
    pipe = target.pipe
    steps = int(steps or target.world.sampler_defaults()[0])
    if steps < 1 or refine < 0 or batch_size < 1:
        raise ErasekitError(f"DDIM inversion: need steps >= 1, refine >= 0, batch_size >= 1 (got {steps}, {refine}, {batch_size})")
    sampler = Sampler(pipe, steps)
    from erasekit.diffusion.speed import accelerate, unet_for

    if fast:
        from erasekit.diffusion.fp8 import precision_of

        accelerate(pipe, precision=precision_of(fast))  # "fp8": the latents of FP8 products (keyed by digest)
    out = []
    starts = range(0, len(latents), batch_size)
    with torch.no_grad(), target.active():
        family = target.family
        model = family.denoiser(pipe)  # the UNet; SD3 / FLUX: the transformer (Euler flow inversion)
        device = model.device
        cond = family.encode(pipe, [prompt], device=device)
        # Guidance of "" against "" is the conditional prediction: one pass.
        uncond = family.encode(pipe, [""], device=device) if prompt != "" else None
        guidance_fn = guided(UNetDenoiser(unet_for(pipe), family), cond, uncond, float(guidance) if prompt != "" else 1.0)
        for start in tqdm(starts, desc="DDIM inversion", unit="batch", disable=not progress or len(starts) < 2, leave=False):
            z = latents[start : start + batch_size].float().to(device, model.dtype)
            out.append(sampler.invert(z, guidance_fn, refine=refine).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def invert_images(target, images: np.ndarray, prompt: str = "", steps: int | None = None, guidance: float = 1.0,
                  refine: int = 0, batch_size: int = 32, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Inverted latents of uint8 RGB images and the budget spent (steps, UNet evaluations, seconds)."""
    from erasekit.diffusion.target import as_target
    from erasekit.metrics.cost import measure_cost

    target = as_target(target)
    steps = int(steps or target.world.sampler_defaults()[0])
    with measure_cost() as cost:
        with target.active():
            z0 = encode_images(target.pipe, images)
        latents = ddim_invert(target, z0, prompt, steps, guidance, refine, batch_size, progress)
    passes = 1 if (guidance <= 1.0 or prompt == "") else 2
    budget = {
        "inversion_steps": steps,
        "inversion_prompt": prompt,
        "inversion_guidance": float(guidance),
        "refine": int(refine),
        "images_used": int(len(images)),
        "unet_evaluations": int(len(images) * steps * (1 + refine) * passes),
        **{k: v for k, v in cost.as_dict().items() if k != "images"},
    }
    budget["images_per_s"] = round(len(images) / max(budget["wall_s"], 1e-9), 3)
    return latents, budget


def ddim_inversion_inputs(latents: torch.Tensor, regenerate_prompt: str, seeds: list[int] | None = None,
                          items: list[dict] | None = None, budget: dict | None = None) -> AttackInputs:
    """One regeneration per inverted latent, with ``regenerate_prompt`` ("" or the concept prompt)."""
    n = len(latents)
    if n < 1:
        raise ErasekitError("no inverted latents to regenerate from")
    return AttackInputs(
        attack="ddim_inversion",
        prompts=[regenerate_prompt] * n,
        seeds=list(seeds) if seeds is not None else list(range(n)),  # only sampler noise (eta > 0) would use them
        latents=latents,
        items=items or [],
        budget=dict(budget or {}, regenerate_prompt=regenerate_prompt),
    )


@ATTACKS.register
class DDIMInversionAttack(Attack):
    needs_unet = False  # the family's denoiser only: SD3 and FLUX.1 too
    name = "ddim_inversion"
    alias = "inversion"
    summary = "VAE-encode concept images, DDIM-invert them to noise, regenerate (empty or concept prompt)"
    Settings = DDIMInversionSettings
    order = 2
    scenarios = {"latent-bb": {"learn_on": "original"}, "latent-wb": {"learn_on": "target"}}

    def inputs(self, ctx: AttackContext, learn_on: str) -> AttackInputs:
        from erasekit.attacks.images import concept_images
        from erasekit.cache import cached, with_record
        from erasekit.safe_load import load_safetensors
        from erasekit.store import write_safetensors_atomic

        s = self.settings
        learner = ctx.learner(learn_on)
        images = concept_images(learner, ctx.concept, ctx.n, ctx.images_folder, RENDER_SEED, ctx.notes)
        if len(images.images) < ctx.n:
            note = (f"the latent scenario makes one image per concept image: {len(images.images)} images in "
                    f"{ctx.images_folder}, so n = {len(images.images)} instead of {ctx.n}")
            log.warning(note)
            ctx.notes.append(note)
        steps = int(s.steps or ctx.steps or learner.world.sampler_defaults()[0])
        key = dict(images=images.digest, learner=learner.cache_id, steps=steps, guidance=s.guidance, prompt=s.prompt,
                   refine=s.refine)

        def invert():
            return invert_images(learner, images.images, s.prompt, steps, s.guidance, s.refine,
                                 batch_size=ctx.batch_size, progress=ctx.progress)

        def save(path, value):  # the latents, then their budget (with the key) beside them
            write_safetensors_atomic(path, {"latents": value[0].contiguous()}, dict(value[1], **key))

        def load(path):
            return (load_safetensors(path, "cached inverted latents")["latents"],
                    json.loads(path.with_suffix(".json").read_text()))

        (latents, budget), reused = cached(ctx.cache_dir, "inverted", (key,), invert, suffix=".safetensors",
                                           save=save, load=load, complete=with_record)
        if reused:
            budget = dict(budget, reused_from_cache=reused)
        prompt = "" if s.prompt_mode == "empty" else ctx.target.world.concept_prompt(ctx.concept)
        items = []
        for i, name in enumerate(images.names):
            item = {"source": name}
            if images.truth is not None:
                item["source_truth"] = images.truth[i]
            items.append(item)
        budget = dict(budget, inverted_on=learn_on)
        return ddim_inversion_inputs(latents, prompt, seeds=[ctx.seed + i for i in range(len(latents))], items=items,
                                     budget=budget)

"""DDIM inversion: from concept images back to the initial noise that regenerates them.

Images are VAE-encoded (posterior mean, times the VAE scaling factor) and run backwards through the
deterministic DDIM sampler with `diffusers.DDIMInverseScheduler` (built from the pipeline's own scheduler
config, so its timesteps mirror the forward sampler's) under a prompt (default the empty prompt) and a guidance
scale (default 1: no classifier-free guidance, the most exact). Regenerating from the inverted latents with the
same model, the same prompt and the same number of steps gives the image back, up to the inversion's
discretisation error (DDIM inversion evaluates the noise at the less noisy latent).

``refine`` > 0 makes each step implicit: the noisier latent is solved as a fixed point of the forward step
(``refine`` extra UNet evaluations per step), which makes the inversion exact up to convergence; plain DDIM
inversion (refine 0) is what the M-ErasureBench scenarios use.

Black-box: invert through the original model, regenerate with the erased one. White-box: both through the
erased model. Regenerate with the empty prompt (hardest case) or with the concept prompt.
"""

from __future__ import annotations


import numpy as np
import torch

from erasekit.attacks.base import AttackInputs
from erasekit.errors import ErasekitError


def encode_images(pipe, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Scaled VAE latents (N, C, h, w), float32 on CPU, of uint8 RGB images at the pipeline's size."""
    from erasekit.generation import image_size

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ErasekitError(f"DDIM inversion needs uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}")
    if tuple(images.shape[1:3]) != image_size(pipe):
        raise ErasekitError(f"images are {images.shape[2]}x{images.shape[1]}, the pipeline makes "
                            f"{image_size(pipe)[1]}x{image_size(pipe)[0]}: resize them first (load_image_folder does)")
    vae = pipe.vae
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2)
            x = (x.float() / 127.5 - 1.0).to(device=vae.device, dtype=vae.dtype)
            out.append(vae.encode(x).latent_dist.mean.float().cpu() * float(vae.config.scaling_factor))
    return torch.cat(out) if out else torch.empty(0)


def _noise_fn(pipe, prompt: str, guidance: float, n: int):
    """eps(latents, t) for a batch of ``n`` under ``prompt`` with classifier-free guidance ``guidance``."""
    from erasekit.models import encode_prompts

    unet = pipe.unet
    with torch.no_grad():
        cond = encode_prompts(pipe, [prompt]).to(unet.device, unet.dtype)
        uncond = encode_prompts(pipe, [""]).to(unet.device, unet.dtype)
    plain = guidance == 1.0 or prompt == ""  # guided eps equals the conditional one

    def eps(latents: torch.Tensor, t) -> torch.Tensor:
        b = len(latents)
        x = latents.to(unet.device, unet.dtype)
        if plain:
            return unet(x, t, encoder_hidden_states=cond.expand(b, -1, -1)).sample.float()
        states = torch.cat([uncond.expand(b, -1, -1), cond.expand(b, -1, -1)])
        e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=states).sample.float().chunk(2)
        return e_u + guidance * (e_c - e_u)

    return eps


def ddim_invert(pipe, latents: torch.Tensor, prompt: str = "", steps: int | None = None, guidance: float = 1.0,
                refine: int = 0, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """Inverted (noise) latents, float32 CPU (N, C, h, w), of clean scaled latents."""
    from diffusers import DDIMInverseScheduler
    from tqdm.auto import tqdm

    from erasekit.generation import default_settings

    steps = int(steps or default_settings(pipe)[0])
    if steps < 1 or refine < 0 or batch_size < 1:
        raise ErasekitError(f"DDIM inversion: need steps >= 1, refine >= 0, batch_size >= 1 (got {steps}, {refine}, {batch_size})")
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(steps)
    eps = _noise_fn(pipe, prompt, float(guidance), len(latents))
    out = []
    starts = range(0, len(latents), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="DDIM inversion", unit="batch", disable=not progress or len(starts) < 2, leave=False):
            z = latents[start : start + batch_size].float().to(pipe.unet.device)
            for t in inverse.timesteps:
                nxt = inverse.step(eps(z, t), t, z).prev_sample
                for _ in range(refine):  # the forward step from nxt uses eps(nxt, t): solve for that nxt
                    nxt = inverse.step(eps(nxt, t), t, z).prev_sample
                z = nxt
            out.append(z.float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def invert_images(pipe, images: np.ndarray, prompt: str = "", steps: int | None = None, guidance: float = 1.0,
                  refine: int = 0, batch_size: int = 32, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Inverted latents of uint8 RGB images and the budget spent (steps, UNet evaluations, seconds)."""
    from erasekit.generation import default_settings
    from erasekit.metrics.cost import measure_cost

    steps = int(steps or default_settings(pipe)[0])
    with measure_cost() as cost:
        latents = ddim_invert(pipe, encode_images(pipe, images), prompt, steps, guidance, refine, batch_size, progress)
    passes = 1 if (guidance == 1.0 or prompt == "") else 2
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

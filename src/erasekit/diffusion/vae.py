"""Images <-> latents through the pipeline's VAE (scaled by its scaling factor, as the UNet sees them).

SDXL's VAE overflows in float16: where the pipeline is SDXL's and the VAE's config says ``force_upcast``, a float16
VAE runs in float32 for the call and is put back, as `StableDiffusionXLPipeline` does.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from erasekit.errors import ErasekitError


def image_size(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """(height, width) in pixels; defaults to the model family's native size (the UNet's sample size times the
    VAE factor; SD3: the transformer's; FLUX.1: its VAE's)."""
    from erasekit.diffusion.family import family_of

    nh, nw = family_of(pipe).image_size(pipe)
    return int(height or nh), int(width or nw)


def _pixels(pipe, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ErasekitError(f"need uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}")
    if tuple(images.shape[1:3]) != image_size(pipe):
        h, w = image_size(pipe)
        raise ErasekitError(f"images are {images.shape[2]}x{images.shape[1]}, the pipeline makes {w}x{h}: resize them "
                            f"first (erasekit.attacks.images.load_image_folder does)")
    return images


@contextmanager
def _vae_for_call(pipe):
    """The VAE to run now: upcast to float32 for the call where SDXL's pipeline would (fp16 + force_upcast)."""
    vae = pipe.vae
    upcast = (vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
              and getattr(pipe, "text_encoder_2", None) is not None and _family_name(pipe) == "sdxl")
    if not upcast:
        yield vae
        return
    vae.to(dtype=torch.float32)
    try:
        yield vae
    finally:
        vae.to(dtype=torch.float16)


def _family_name(pipe) -> str:
    from erasekit.diffusion.family import family_of

    return family_of(pipe).name


def _denoiser_device(pipe):
    from erasekit.diffusion.family import family_of

    return family_of(pipe).denoiser(pipe).device


def encode_distribution(pipe, images: np.ndarray, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (N, C, h, w), float32 on the denoiser's device, of the VAE posterior of uint8 images, unscaled."""
    images = _pixels(pipe, images)
    means, stds = [], []
    with torch.no_grad(), _vae_for_call(pipe) as vae:
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2)
            x = (x.float() / 127.5 - 1.0).to(device=vae.device, dtype=vae.dtype)
            dist = vae.encode(x).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    if not means:
        return torch.empty(0), torch.empty(0)
    device = _denoiser_device(pipe)
    return torch.cat(means).to(device), torch.cat(stds).to(device)


def encode_images(pipe, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Scaled latents (posterior mean, less the VAE's shift factor where it has one, times the scaling factor),
    float32 on CPU."""
    mean, _ = encode_distribution(pipe, images, batch_size)
    shift = getattr(pipe.vae.config, "shift_factor", None)
    if shift is not None:  # SD3 / FLUX VAEs: diffusers' (z - shift) * scale
        mean = mean - float(shift)
    return mean.cpu() * float(pipe.vae.config.scaling_factor)


def decode_latents(pipe, latents: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) images of scaled latents, rounded as diffusers' pipelines round them; decoded
    ``batch_size`` at a time (None: all at once, one VAE call)."""

    cfg = pipe.vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    out = []
    from erasekit.diffusion.speed import vae_decode_for

    with torch.no_grad(), _vae_for_call(pipe) as vae:
        decode = vae_decode_for(pipe, vae)
        step = batch_size or max(len(latents), 1)
        for i in range(0, len(latents), step):
            z = latents[i : i + step].to(vae.device, vae.dtype)
            if mean is not None and std is not None:  # diffusers' rule for VAEs with latent statistics
                m = torch.tensor(mean).view(1, -1, 1, 1).to(z.device, z.dtype)
                s = torch.tensor(std).view(1, -1, 1, 1).to(z.device, z.dtype)
                z = z * s / cfg.scaling_factor + m
            else:
                z = z / cfg.scaling_factor
                if getattr(cfg, "shift_factor", None) is not None:  # SD3 / FLUX VAEs: z / scale + shift
                    z = z + cfg.shift_factor
            x = decode(z)
            out.append(_to_uint8(x))
    if not out:
        h, w = image_size(pipe)
        return np.empty((0, h, w, 3), np.uint8)
    return np.concatenate(out)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """Decoded images in [-1, 1] -> uint8 NHWC, on the tensor's device: the same float32 arithmetic and
    round-half-to-even as `to_uint8` (diffusers' rounding, so bit-identical), with a quarter of the bytes to copy
    to the host and none of the CPU passes over float images."""
    x = (x / 2 + 0.5).clamp(0, 1).float()
    return (x.clamp(0.0, 1.0) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()

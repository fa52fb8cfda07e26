"""Images <-> latents through the pipeline's VAE (scaled by its scaling factor, as the UNet sees them)."""

from __future__ import annotations

import numpy as np
import torch

from erasekit.errors import ErasekitError


def image_size(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """(height, width) in pixels; defaults to the UNet's native sample size times the VAE factor."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return int(height or native), int(width or native)


def _pixels(pipe, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ErasekitError(f"need uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}")
    if tuple(images.shape[1:3]) != image_size(pipe):
        h, w = image_size(pipe)
        raise ErasekitError(f"images are {images.shape[2]}x{images.shape[1]}, the pipeline makes {w}x{h}: resize them "
                            f"first (erasekit.attacks.images.load_image_folder does)")
    return images


def encode_distribution(pipe, images: np.ndarray, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (N, C, h, w), float32 on the UNet's device, of the VAE posterior of uint8 images, unscaled."""
    images = _pixels(pipe, images)
    vae = pipe.vae
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2)
            x = (x.float() / 127.5 - 1.0).to(device=vae.device, dtype=vae.dtype)
            dist = vae.encode(x).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    if not means:
        return torch.empty(0), torch.empty(0)
    return torch.cat(means).to(pipe.unet.device), torch.cat(stds).to(pipe.unet.device)


def encode_images(pipe, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Scaled latents (posterior mean times the scaling factor), float32 on CPU."""
    mean, _ = encode_distribution(pipe, images, batch_size)
    return mean.cpu() * float(pipe.vae.config.scaling_factor)


def decode_latents(pipe, latents: torch.Tensor) -> np.ndarray:
    """uint8 (N, H, W, 3) images of scaled latents, rounded as diffusers' pipelines round them."""
    from erasekit.diffusion.sampler import to_uint8

    vae = pipe.vae
    with torch.no_grad():
        x = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    x = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return to_uint8(x)

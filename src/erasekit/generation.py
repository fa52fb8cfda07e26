"""Batched, per-image-seeded generation with any `StableDiffusionPipeline`.

Every image has its own seed: its initial latents and any later sampler noise come from its own
``torch.Generator("cpu").manual_seed(seed)``, so its noise does not depend on the batch it is generated
in, on the batch size or on the device. (Pixels can: on CPU, batched kernels may differ in the last float
bit between batch sizes, and after rounding to uint8 an image then differs from its single-image self by
at most 1 level at a few pixels, which the tests allow; GPU and CPU kernels differ more.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from erasekit.image_store import save_images  # noqa: F401  (part of this module's public API)

SD_DEFAULT_STEPS = 25
SD_DEFAULT_GUIDANCE = 7.5


def default_settings(pipe) -> tuple[int, float]:
    """(DDIM steps, guidance scale) to use when the caller gives none: the toy's own, else SD's usual."""
    from erasekit.models.loading import is_toy_pipeline

    if is_toy_pipeline(pipe):
        from erasekit.toy.architecture import DEFAULT_GUIDANCE, DEFAULT_STEPS

        return DEFAULT_STEPS, DEFAULT_GUIDANCE
    return SD_DEFAULT_STEPS, SD_DEFAULT_GUIDANCE


def image_size(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """(height, width) in pixels; defaults to the UNet's native sample size times the VAE factor."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return int(height or native), int(width or native)


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def _latent_shape(pipe, height: int, width: int) -> tuple[int, int, int]:
    f = pipe.vae_scale_factor
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of the VAE factor {f}, got {height}x{width}")
    return pipe.unet.config.in_channels, height // f, width // f


def _draw_latents(pipe, generators, height: int, width: int) -> torch.Tensor:
    shape = _latent_shape(pipe, height, width)
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])


def initial_latents(pipe, seeds: Sequence[int], height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Float32 CPU latents (N, C, h, w), one standard normal draw per seed (the pipeline scales them by
    ``scheduler.init_noise_sigma`` itself)."""
    height, width = image_size(pipe, height, width)
    return _draw_latents(pipe, seed_generators(seeds), height, width)


def _per_item(value, n: int, what: str) -> list | None:
    """Broadcast a str / None to n items, or check a list has n items."""
    if value is None or isinstance(value, str):
        return None if value is None else [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{what}: expected {n} items, got {len(value)}")
    return value


def _device_and_dtype(pipe) -> tuple[torch.device, torch.dtype]:
    return pipe.unet.device, pipe.unet.dtype


def _to_uint8(images: np.ndarray) -> np.ndarray:
    # The same rounding as diffusers' numpy_to_pil.
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def generate(
    pipe,
    prompts: str | Sequence[str] | None,
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 32,
    negative_prompt: str | Sequence[str] | None = None,
    latents: torch.Tensor | None = None,
    prompt_embeds: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    eta: float = 0.0,
    progress: bool = True,
) -> np.ndarray:
    """Generate one image per seed; returns uint8 (N, H, W, 3).

    ``prompts``: one per seed, or one string for all (None when ``prompt_embeds`` (N, T, D) is given).
    ``latents``: (N, C, h, w) initial latents replacing the seeded draw (e.g. from DDIM inversion); the seeds
    then only drive sampler noise (``eta > 0``). ``steps``/``guidance`` default to `default_settings`.
    """
    seeds = [int(s) for s in seeds]
    n = len(seeds)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prompt_embeds is None and prompts is None:
        raise ValueError("give prompts or prompt_embeds")
    prompts = _per_item(prompts, n, "prompts")
    negatives = _per_item(negative_prompt, n, "negative_prompt")
    if prompt_embeds is not None and len(prompt_embeds) != n:
        raise ValueError(f"prompt_embeds: expected {n} items, got {len(prompt_embeds)}")
    if latents is not None and len(latents) != n:
        raise ValueError(f"latents: expected {n} items, got {len(latents)}")
    default_steps, default_guidance = default_settings(pipe)
    steps = int(steps or default_steps)
    guidance = float(default_guidance if guidance is None else guidance)
    height, width = image_size(pipe, height, width)
    device, dtype = _device_and_dtype(pipe)

    from tqdm.auto import tqdm

    out = np.empty((n, height, width, 3), np.uint8)
    starts = range(0, n, batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="generating", unit="batch", disable=not progress or len(starts) < 2, leave=False):
            sl = slice(start, start + batch_size)
            generators = seed_generators(seeds[sl])
            # Drawn from the image's own generator, which then also supplies its sampler noise.
            batch_latents = _draw_latents(pipe, generators, height, width) if latents is None else latents[sl]
            kwargs = dict(
                num_inference_steps=steps,
                guidance_scale=guidance,
                latents=batch_latents.to(device=device, dtype=dtype),
                generator=generators,
                eta=eta,
                height=height,
                width=width,
                output_type="np",
            )
            if prompt_embeds is not None:
                kwargs["prompt_embeds"] = prompt_embeds[sl].to(device=device, dtype=dtype)
            else:
                kwargs["prompt"] = prompts[sl]
            if negatives is not None:
                kwargs["negative_prompt"] = negatives[sl]
            images = pipe(**kwargs).images
            out[sl] = _to_uint8(np.asarray(images))
    return out


def generate_to_dir(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_dir,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 32,
    negative_prompt: str | None = None,
    eta: float = 0.0,
    model: str = "",
    edit: str | None = None,
    model_fingerprint: str | None = None,
    progress: bool = True,
) -> tuple[list[dict], int]:
    """Generate image i from (prompts[i], seeds[i]) into ``out_dir``, resumably (see `erasekit.image_store`).

    ``model`` is recorded as given; ``edit`` identifies an applied edit (part of the cache key, for edits
    that do not change weights). Returns the records in request order and how many images were generated.
    """
    from tqdm.auto import tqdm

    from erasekit.image_store import read_index, record_key, write_grid
    from erasekit.models.fingerprint import fingerprint

    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    default_steps, default_guidance = default_settings(pipe)
    height, width = image_size(pipe)
    settings = dict(
        steps=int(steps or default_steps),
        guidance=float(default_guidance if guidance is None else guidance),
        eta=float(eta),
        scheduler=type(pipe.scheduler).__name__,
        height=height,
        width=width,
        negative_prompt=negative_prompt,
        model=model,
        fingerprint=model_fingerprint or fingerprint(pipe),
        edit=edit,
    )
    wanted = [dict(settings, prompt=p, seed=s) for p, s in zip(prompts, seeds)]
    done = read_index(out_dir)
    todo = [i for i, rec in enumerate(wanted) if record_key(rec) not in done]
    bar = tqdm(total=len(todo), unit="img", desc="generating", disable=not progress or not todo)
    # Generate and save batch by batch, so that a killed run keeps every finished batch.
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        images = generate(
            pipe, [prompts[i] for i in idx], [seeds[i] for i in idx],
            steps=settings["steps"], guidance=settings["guidance"], batch_size=batch_size,
            negative_prompt=negative_prompt, eta=eta, progress=False,
        )
        for rec in save_images(images, out_dir, [wanted[i] for i in idx], grid=False):
            done[rec["key"]] = rec
        bar.update(len(idx))
    bar.close()
    records = [done[record_key(rec)] for rec in wanted]
    if records:
        write_grid(out_dir, records)
    return records, len(todo)


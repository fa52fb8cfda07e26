"""The base model family: SD-1.x / SD-2.x (and the embedded world), a UNet with one text encoder.

Every other family subclasses `SDFamily` (`erasekit.diffusion.family` has SDXL and the registry; SD3 and FLUX.1 are
`erasekit.diffusion.sd3` / `erasekit.diffusion.flux`, on `erasekit.diffusion.flow`). It lives apart from the
registry so that the family modules and the registry import in one direction only.
"""

from __future__ import annotations

from typing import Sequence

import torch

from erasekit.diffusion.conditioning import Conditioning
from erasekit.diffusion.transfer import to_device
from erasekit.errors import ErasekitError


class SDFamily:
    """SD-1.x / SD-2.x (and the embedded world): a UNet with one text encoder."""

    name = "sd"

    def matches(self, pipe) -> bool:
        return getattr(pipe, "unet", None) is not None

    def encoders(self, pipe) -> list[tuple[str, object, object]]:
        """(name, tokenizer, text encoder) of every text encoder; names are the keys of textual-inversion files."""
        return [("", pipe.tokenizer, pipe.text_encoder)]

    def encode(self, pipe, prompts, device=None, *, tokenizers: Sequence | None = None,
               size: tuple[int, int] | None = None) -> Conditioning:
        """Conditioning of ``prompts``; ``tokenizers`` (one per encoder) replace the pipeline's (textual inversion's
        copies with new tokens, with prompts already expanded); ``size`` is ignored (SDXL's time ids)."""
        from erasekit.models.prompts import encode_prompts

        tok = tokenizers[0] if tokenizers is not None else None
        return Conditioning(encode_prompts(pipe, prompts, device=device, tokenizer=tok))

    def unconditional(self, pipe, negatives: Sequence[str] | None, device=None,
                      size: tuple[int, int] | None = None) -> Conditioning:
        """Classifier-free guidance's unconditional branch: the negative prompts, or the empty prompt."""
        return self.encode(pipe, list(negatives) if negatives is not None else [""], device=device, size=size)

    def token_embeddings(self, pipe) -> list[torch.Tensor]:
        """Each encoder's input-embedding table (V, E), in `encoders` order (SDXL's share one vocabulary)."""
        return [enc.get_input_embeddings().weight for _, _, enc in self.encoders(pipe)]

    def encode_with_prefix(self, pipe, prompts, prefixes: Sequence[torch.Tensor],
                           size: tuple[int, int] | None = None) -> Conditioning:
        """Conditioning of ``[prefix; prompt]`` with gradients to the prefix: ``prefixes`` holds, per encoder
        (`encoders` order), input-embedding vectors (B, k, E) placed right after BOS/[CLS]; as `encode` otherwise
        (attacks' relaxed or soft prompt tokens)."""
        (_, tok, enc), = self.encoders(pipe)
        (prefix,) = prefixes
        return Conditioning(_encode_prefixed(tok, enc, prompts, prefix)[0])

    def from_states(self, pipe, states, size: tuple[int, int] | None = None) -> Conditioning:
        """Conditioning from ready-made text states (learned embeddings, attacks' optimised prompts)."""
        if isinstance(states, Conditioning):
            return states
        return Conditioning(states)

    def text_width(self, pipe) -> int:
        return int(pipe.text_encoder.config.hidden_size)

    def prediction_type(self, pipe) -> str:
        return self.schedule(pipe).prediction_type

    # -- the model call and its noise schedule -----------------------------------------------------------
    def schedule(self, pipe):
        """The forward process and prediction type (`erasekit.diffusion.schedule.NoiseSchedule`)."""
        from erasekit.diffusion.schedule import NoiseSchedule

        return NoiseSchedule(pipe.scheduler.config)

    sampling_scheduler_name = "DDIMScheduler"  # the stated default; the folder's own scheduler is left in place

    def sampling_scheduler(self, pipe):
        """A private DDIM scheduler from the pipeline's schedule (same betas, prediction type and offsets): every
        method samples the same way on every model, whatever scheduler the checkpoint folder names."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(pipe.scheduler.config)

    def inversion_scheduler(self, pipe):
        """DDIM run backwards, from the same schedule (DDIM inversion)."""
        from diffusers import DDIMInverseScheduler

        return DDIMInverseScheduler.from_config(pipe.scheduler.config)

    def editable_components(self, pipe) -> tuple[str, ...]:
        """The pipeline components whose weights an edit may name (``unet.<param>``, ``text_encoder.<param>``)."""
        return ("unet", "text_encoder", "vae")

    def attention_sites(self, pipe) -> list:
        """Where the denoiser reads the text (`erasekit.diffusion.sites`): the UNet's cross-attention modules."""
        from erasekit.diffusion.sites import unet_cross_attention_sites

        return unet_cross_attention_sites(pipe.unet)

    def denoise(self, model, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        """One call of the family's denoising network in its own prediction type (a UNet here)."""
        return model(x, t, **cond.unet_kwargs()).sample

    # -- the sampling loop's family-specific parts (`erasekit.diffusion.sampler`) ----------------------------
    flow = False  # flow-matching families (SD3, FLUX.1: `erasekit.diffusion.flow`) set this

    def denoiser(self, pipe):
        """The denoising network (the UNet here; a transformer for flow-matching families)."""
        return pipe.unet

    def image_size(self, pipe) -> tuple[int, int]:
        """The native (height, width) in pixels: the UNet's sample size times the VAE factor."""
        side = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
        return side, side

    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, int, int]:
        f = pipe.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of the VAE factor {f}, got {height}x{width}")
        return pipe.unet.config.in_channels, height // f, width // f

    def set_timesteps(self, pipe, scheduler, steps: int, latent_hw) -> None:
        scheduler.set_timesteps(steps)  # DDIM's timesteps do not depend on the image size

    def steps_rule(self, scheduler):
        """x0/eps updates between the sampler's timesteps (`DDIMSteps`), for hooks that edit x0 or eps."""
        from erasekit.diffusion.schedule import DDIMSteps

        return DDIMSteps(scheduler)

    def model_input(self, scheduler, x, t):
        return scheduler.scale_model_input(x, t)

    def init_noise_sigma(self, scheduler) -> float:
        return scheduler.init_noise_sigma

    def step(self, scheduler, index: int, output, t, x, eta: float = 0.0, generator=None):
        """(x0, x_next) of one scheduler step from ``x`` at ``t`` (the ``index``-th of the sampler's timesteps)."""
        kwargs = {"eta": eta}
        if eta > 0 and generator is not None:
            kwargs["generator"] = generator
        out = scheduler.step(output, t, x, return_dict=True, **kwargs)
        return out.pred_original_sample, out.prev_sample

    def inversion_steps(self, pipe, scheduler, steps: int, latent_hw) -> list:
        """(t, step) pairs of the inversion run, ``step(output, x) -> x_next``: DDIM's inverse scheduler."""
        scheduler.set_timesteps(steps)
        return [(t, lambda output, x, t=t: scheduler.step(output, t, x).prev_sample) for t in scheduler.timesteps]


def _encode_prefixed(tok, encoder, prompts, prefix: torch.Tensor, **kwargs):
    """The encoder's output for ``[prefix; prompt]`` (``prefix`` (B, k, E) input embeddings after BOS/[CLS], the
    prompt's tokens shifted right by k and cut to fit); tokenised and masked as `encode_prompts` does."""
    b, k, _ = prefix.shape
    inputs = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                 return_tensors="pt")
    ids, mask = inputs.input_ids, inputs.attention_mask
    if k >= ids.shape[1] - 1:
        raise ErasekitError(f"{k} prefix tokens do not fit the text encoder's {ids.shape[1]} positions")
    # BOS stands in at the prefix positions (the hook replaces its embeddings), so EOS stays the first EOS
    # (CLIP pools there).
    shifted = torch.cat([ids[:, :1], ids[:, :1].expand(b, k), ids[:, 1 : ids.shape[1] - k]], 1)
    mask = torch.cat([mask[:, :1], torch.ones(b, k, dtype=mask.dtype), mask[:, 1 : mask.shape[1] - k]], 1)
    # A prompt that fills the positions loses its EOS/[SEP] to the shift: end it with one, as the tokenizer's own
    # truncation does (CLIP pools at the EOS: SDXL's pooled embedding).
    end = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if end is not None:
        lost = (ids == end).any(1) & ~(shifted == end).any(1)
        shifted[lost, -1] = end
    ids = shifted

    def post(module, args, output):
        vec = prefix.to(device=output.device, dtype=output.dtype)
        return torch.cat([output[:, :1], vec, output[:, 1 + k :]], 1)

    handle = encoder.get_input_embeddings().register_forward_hook(post)
    try:
        use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
        return encoder(to_device(ids, encoder.device), attention_mask=to_device(mask, encoder.device) if use_mask else None,
                       **kwargs)
    finally:
        handle.remove()


SD = SDFamily()

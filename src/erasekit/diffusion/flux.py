"""FLUX.1 (`FluxPipeline`): a double- and single-stream transformer on flow matching, guidance-distilled.

Text: CLIP-L's pooled output (768, the transformer's ``pooled_projections``) and T5-XXL's states (512 positions for
FLUX.1-dev), exactly as `FluxPipeline.encode_prompt` builds them; text ids are zeros. Latents stay (B, C, h, w)
in erasekit (hooks, inversion, the VAE see them as on every model); the family packs them into 2x2 patches
((B, h/2 * w/2, 4C), FluxPipeline's ``_pack_latents``) with their rotary image ids around each transformer call and
unpacks the output, so the loop's arithmetic is the pipeline's element for element.

Guidance: FLUX.1-dev is guidance-distilled: erasekit's guidance scale is the transformer's ``guidance`` input
(FluxPipeline's ``guidance_scale``), one transformer call per step. True classifier-free guidance, as FluxPipeline's
``true_cfg_scale`` with a negative prompt, is an option (``Target(pipe).with_true_cfg(scale)``, ``erasekit generate
--true-cfg``; `set_true_cfg` underneath): then the negative prompt (or the empty prompt: the pipeline's
``negative_prompt=""``) is the unconditional branch, ``u + true_cfg (c - u)`` on the velocity, batched in one call (the
pipeline makes two calls: equal up to float rounding). FLUX.1-schnell (no guidance embedding) ignores the scale.
Attention sites: the double-stream blocks' text-side K/V (``transformer.double.<i>.text``: ``add_k_proj`` /
``add_v_proj``); the single-stream blocks project text and image together and have no text-only projection.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from erasekit.diffusion.conditioning import Conditioning
from erasekit.diffusion.flow import FlowMatchingFamily
from erasekit.diffusion.transfer import to_device

FLUX_T5_TOKENS = 512  # FluxPipeline's default max_sequence_length (FLUX.1-dev)
FLUX_DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale: the distilled guidance of method calls that name none
_TRUE_CFG = "_erasekit_true_cfg_scale"


def set_true_cfg(pipe, scale: float) -> None:
    """Sample ``pipe`` with true classifier-free guidance at ``scale`` (> 1; 1 turns it off), as FluxPipeline's
    ``true_cfg_scale``: the negative prompt (or the empty one) becomes an unconditional branch."""
    setattr(pipe.transformer, _TRUE_CFG, float(scale))


def true_cfg(transformer) -> float:
    return float(getattr(transformer, _TRUE_CFG, 1.0))


def check_true_cfg(pipe, scale: float | None) -> None:
    """A true-CFG scale is FLUX.1's option (> 1 on; None or 1 off); elsewhere the guidance scale already is
    classifier-free guidance."""
    from erasekit.errors import ErasekitError

    if scale is None or float(scale) == 1.0:
        return
    if not float(scale) >= 1.0:
        raise ErasekitError(f"the true-CFG scale must be at least 1 (1: off), got {scale}")
    if not FLUX.matches(pipe):
        raise ErasekitError(f"true CFG is FLUX.1's option (its guidance scale is distilled guidance); on "
                            f"{type(pipe).__name__} the guidance scale already is classifier-free guidance")


@contextmanager
def true_cfg_scope(pipe, scale: float | None):
    """``pipe`` samples with true CFG at ``scale`` inside the block (None or 1: off), then as before."""
    check_true_cfg(pipe, scale)
    if scale is None or float(scale) == 1.0:
        yield
        return
    before = getattr(pipe.transformer, _TRUE_CFG, None)
    set_true_cfg(pipe, scale)
    try:
        yield
    finally:
        if before is None:
            delattr(pipe.transformer, _TRUE_CFG)
        else:
            setattr(pipe.transformer, _TRUE_CFG, before)


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w): FluxPipeline._unpack_latents."""
    b, _, ch = x.shape
    return x.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch // 4, h, w)


def image_ids(h2: int, w2: int, device, dtype) -> torch.Tensor:
    """(h2 * w2, 3) rotary ids (0, row, column) of the packed patches: FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    site_kind = "double"
    latent_multiple = 2
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def matches(self, pipe) -> bool:
        return type(pipe).__name__.startswith("Flux") and getattr(pipe, "transformer", None) is not None

    def encoders(self, pipe):
        return [("clip_l", pipe.tokenizer, pipe.text_encoder), ("t5", pipe.tokenizer_2, pipe.text_encoder_2)]

    def image_size(self, pipe) -> tuple[int, int]:
        side = int(pipe.vae.config.sample_size)  # 1024 for FLUX.1's VAE (FluxPipeline's 128 * 8)
        return side, side

    def latent_channels(self, pipe) -> int:
        return int(pipe.transformer.config.in_channels) // 4

    def image_seq_len(self, pipe, latent_hw) -> int:
        return (latent_hw[0] // 2) * (latent_hw[1] // 2)

    def timestep_kwargs(self, pipe, scheduler, steps, latent_hw) -> dict:
        kwargs = super().timestep_kwargs(pipe, scheduler, steps, latent_hw)
        if not scheduler.config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)  # FluxPipeline.__call__'s default sigmas
        return kwargs

    def encode(self, pipe, prompts, device=None, *, tokenizers=None, size=None) -> Conditioning:
        from erasekit.models.prompts import ENCODE_CHUNK, as_list, expand_textual_inversion

        prompts = as_list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode")
        (_, tok, clip), (_, tok5, t5) = self.encoders(pipe)
        if tokenizers is not None:
            tok, tok5 = tokenizers
        out_device = torch.device(device) if device is not None else t5.device
        states, pooled = [], []
        for i in range(0, len(prompts), ENCODE_CHUNK):
            chunk = prompts[i : i + ENCODE_CHUNK]
            texts = chunk if tokenizers is not None else expand_textual_inversion(pipe, chunk, tok)
            ids = tok(texts, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
                      return_tensors="pt").input_ids
            pooled.append(clip(to_device(ids, clip.device), output_hidden_states=False).pooler_output.to(
                dtype=clip.dtype, device=out_device))
            texts = chunk if tokenizers is not None else expand_textual_inversion(pipe, chunk, tok5)
            ids = tok5(texts, padding="max_length", max_length=self.t5_length(pipe, tok5, FLUX_T5_TOKENS),
                       truncation=True, return_tensors="pt").input_ids
            states.append(t5(to_device(ids, t5.device), output_hidden_states=False)[0].to(dtype=t5.dtype,
                                                                                             device=out_device))
        return Conditioning(torch.cat(states), {"pooled": torch.cat(pooled)})

    def needs_uncond(self, pipe, scale: float) -> bool:
        """True CFG needs the unconditional (negative) branch whatever the distilled guidance scale."""
        return true_cfg(pipe.transformer) > 1.0

    def encode_with_prefix(self, pipe, prompts, prefixes, size=None) -> Conditioning:
        """As `encode` with ``prefixes`` ((B, k, E) for CLIP-L after its BOS, for T5 at its first positions):
        attacks' prefix tokens."""
        from erasekit.diffusion.family_base import _encode_prefixed
        from erasekit.diffusion.flow import encode_t5_with_prefix

        (_, tok, clip), (_, tok5, t5) = self.encoders(pipe)
        if len(prefixes) != 2:
            raise ValueError(f"{len(prefixes)} prefixes for 2 text encoders")
        pooled = _encode_prefixed(tok, clip, prompts, prefixes[0]).pooler_output.to(clip.dtype)
        states = encode_t5_with_prefix(tok5, t5, prompts, prefixes[1], self.t5_length(pipe, tok5, FLUX_T5_TOKENS))
        return Conditioning(states.to(t5.dtype), {"pooled": pooled.to(states.device)})

    def guided(self, model, cond: Conditioning, uncond: Conditioning | None, scale: float):
        """The distilled guidance ``scale`` as the transformer's input; true CFG only where set (`set_true_cfg`,
        `true_cfg_scope`: `Target.with_true_cfg`, ``erasekit generate --true-cfg``)."""
        from erasekit.diffusion.guidance import ClassifierFreeGuidance, Conditional

        model.options = {"guidance": float(scale)}
        cfg = true_cfg(model.unet if not hasattr(model.unet, "unet") else model.unet.unet)
        if cfg > 1.0 and uncond is not None:
            return ClassifierFreeGuidance(model, cond, uncond, cfg)
        return Conditional(model, cond)

    def denoise(self, model, x: torch.Tensor, t, cond: Conditioning, guidance: float | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        t = torch.as_tensor(t, device=x.device)
        timestep = (t.expand(b) if t.ndim == 0 else t).to(x.dtype)
        g = None
        if model.config.guidance_embeds:
            value = FLUX_DEFAULT_GUIDANCE if guidance is None else guidance
            g = torch.full([1], value, device=x.device, dtype=torch.float32).expand(b)
        txt_ids = torch.zeros(cond.states.shape[1], 3, device=x.device, dtype=x.dtype)
        out = model(hidden_states=pack(x), timestep=timestep / 1000, guidance=g,
                    pooled_projections=cond.added["pooled"], encoder_hidden_states=cond.states, txt_ids=txt_ids,
                    img_ids=image_ids(h // 2, w // 2, x.device, x.dtype), return_dict=False)[0]
        return unpack(out, h, w)


FLUX = FluxFamily()

"""Model families: everything that differs between model generations, owned by one adapter per family.

A family owns how prompts become `Conditioning` (its text encoders), the call of its denoising network
(`denoise`), its noise schedule and prediction type (`schedule`: the one place that converts outputs and builds
training targets), the schedulers erasekit samples and inverts with (DDIM from the pipeline's own config: the
stated default; the folder's scheduler is left in place), the components an edit may change
(`editable_components`) and where the text enters the denoiser (`attention_sites`). `family_of(pipe)` is the one
detection function; a new family is one class registered with `register_family`.

`SDFamily` covers SD-1.x (CLIP ViT-L, 768-d), SD-2.x (OpenCLIP, 1024-d, v-prediction) and the embedded world
(MiniLM, 384-d): one text encoder whose token states are the cross-attention input.

`SDXLFamily` covers SDXL: two text encoders (CLIP ViT-L and OpenCLIP bigG), whose penultimate-layer states are
concatenated (768 + 1280 = 2048-d, the cross-attention input), plus added conditioning: the second encoder's pooled
projection ("text_embeds", 1280-d) and the time ids (original size, crop top-left, target size), exactly as
`StableDiffusionXLPipeline.encode_prompt` / `_get_add_time_ids` build them. Its unconditional conditioning for an
empty negative prompt is all zeros when the pipeline's ``force_zeros_for_empty_prompt`` is set (SDXL-base).

Everything that encodes text for the UNet (generation, erasers' text states, ESD, textual inversion, defences)
goes through ``family.encode`` (attacks' optimised prefix tokens: ``family.encode_with_prefix``), so that every
method sees the states the UNet sees.
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


class SDXLFamily(SDFamily):
    name = "sdxl"

    def matches(self, pipe) -> bool:
        return (getattr(pipe, "text_encoder_2", None) is not None
                or type(pipe).__name__ == "StableDiffusionXLPipeline")

    def encoders(self, pipe):
        found = []
        if getattr(pipe, "text_encoder", None) is not None:
            found.append(("clip_l", pipe.tokenizer, pipe.text_encoder))
        found.append(("clip_g", pipe.tokenizer_2, pipe.text_encoder_2))
        return found

    def text_width(self, pipe) -> int:
        return sum(int(enc.config.hidden_size) for _, _, enc in self.encoders(pipe))

    def editable_components(self, pipe) -> tuple[str, ...]:
        return ("unet", "text_encoder", "text_encoder_2", "vae")

    def time_ids(self, pipe, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(1, 6) float32: original size, crop (0, 0), target size, as `_get_add_time_ids` with its defaults."""
        from erasekit.diffusion.vae import image_size

        h, w = size if size is not None else image_size(pipe)
        ids = [h, w, 0, 0, h, w]
        expected = pipe.unet.add_embedding.linear_1.in_features
        got = pipe.unet.config.addition_time_embed_dim * len(ids) + int(pipe.text_encoder_2.config.projection_dim)
        if expected != got:
            raise ErasekitError(f"this SDXL UNet expects added embeddings of width {expected}, but time ids and the "
                                f"second text encoder's projection give {got}: the pipeline's parts do not fit")
        return torch.tensor([ids], dtype=torch.float32)

    def encode(self, pipe, prompts, device=None, *, tokenizers=None, size=None) -> Conditioning:
        from erasekit.models.prompts import ENCODE_CHUNK, as_list, expand_textual_inversion

        prompts = as_list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode")
        encoders = self.encoders(pipe)
        out_device = torch.device(device) if device is not None else pipe.text_encoder_2.device
        states_all, pooled_all = [], []
        for i in range(0, len(prompts), ENCODE_CHUNK):
            chunk = prompts[i : i + ENCODE_CHUNK]
            parts, pooled = [], None
            for k, (_, tok, enc) in enumerate(encoders):
                if tokenizers is not None:
                    tok, texts = tokenizers[k], chunk
                else:
                    texts = expand_textual_inversion(pipe, chunk, tok)
                ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
                out = enc(to_device(ids, enc.device), output_hidden_states=True)
                if out[0].ndim == 2:  # the projection model's pooled text embedding (diffusers keeps the last)
                    pooled = out[0]
                parts.append(out.hidden_states[-2])
            states_all.append(torch.cat(parts, dim=-1))
            pooled_all.append(pooled)
        return self._joined(pipe, torch.cat(states_all), torch.cat(pooled_all), out_device, size)

    def _joined(self, pipe, states, pooled, device, size) -> Conditioning:
        """The concatenated states and the pooled embedding, with time ids, on ``device`` in the encoder's dtype."""
        dtype = pipe.text_encoder_2.dtype
        time_ids = self.time_ids(pipe, size).to(device, dtype).repeat(len(states), 1)
        return Conditioning(states.to(device, dtype), {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids})

    def encode_with_prefix(self, pipe, prompts, prefixes, size=None) -> Conditioning:
        # One prefix per encoder (their widths differ); states and pooled projection as `encode` builds them.
        encoders = self.encoders(pipe)
        if len(prefixes) != len(encoders):
            raise ValueError(f"{len(prefixes)} prefixes for {len(encoders)} text encoders")
        parts, pooled = [], None
        for (_, tok, enc), prefix in zip(encoders, prefixes):
            out = _encode_prefixed(tok, enc, prompts, prefix, output_hidden_states=True)
            if out[0].ndim == 2:
                pooled = out[0]
            parts.append(out.hidden_states[-2])
        return self._joined(pipe, torch.cat(parts, dim=-1), pooled, pipe.text_encoder_2.device, size)

    def unconditional(self, pipe, negatives, device=None, size=None) -> Conditioning:
        if negatives is None and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            cond = self.encode(pipe, [""], device=device, size=size)  # for shapes, dtypes and time ids
            return Conditioning(torch.zeros_like(cond.states),
                                {"text_embeds": torch.zeros_like(cond.added["text_embeds"]),
                                 "time_ids": cond.added["time_ids"]})
        return super().unconditional(pipe, negatives, device=device, size=size)

    def from_states(self, pipe, states, size=None) -> Conditioning:
        if isinstance(states, Conditioning):
            if "text_embeds" not in states.added:
                raise ErasekitError("SDXL conditioning needs the pooled text embedding ('text_embeds') beside the "
                                    "token states")
            if "time_ids" not in states.added:
                ids = self.time_ids(pipe, size).to(states.states.device, states.states.dtype)
                states = Conditioning(states.states, dict(states.added, time_ids=ids.repeat(len(states), 1)))
            return states
        raise ErasekitError("SDXL needs the pooled text embedding with the token states: pass a Conditioning "
                            "(family.encode(...) or Conditioning(states, {'text_embeds': pooled})), not a bare tensor")


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
SDXL = SDXLFamily()
# Every family, asked in order: the first whose `matches(pipe)` holds owns the pipeline. A new family (one file)
# registers itself with `register_family`, ahead of the ones it specialises.
FAMILIES: list = [SDXL, SD]


def register_family(family, before=None) -> None:
    """Add ``family`` to `FAMILIES` (ahead of ``before``, default: ahead of every family it was not placed after)."""
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"a model family named {family.name!r} is already registered")
    FAMILIES.insert(FAMILIES.index(before) if before is not None else 0, family)


def family_of(pipe):
    """The adapter for ``pipe``: the one place that tells model families apart."""
    for family in FAMILIES:
        if family.matches(pipe):
            return family
    raise ErasekitError(f"{type(pipe).__name__} is not a pipeline of a supported model family "
                        f"({', '.join(f.name for f in FAMILIES)})")


def is_sdxl(pipe) -> bool:
    return family_of(pipe) is SDXL


# The flow-matching families register themselves ahead of SDXL (their pipelines have a text_encoder_2 too).
from erasekit.diffusion import flux as _flux, sd3 as _sd3  # noqa: E402,F401

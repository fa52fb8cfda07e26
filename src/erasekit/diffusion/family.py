"""Model families: everything that differs between model generations, owned by one adapter per family.

A family owns how prompts become `Conditioning` (its text encoders), the call of its denoising network
(`denoise`), its noise schedule and prediction type (`schedule`: the one place that converts outputs and builds
training targets), the schedulers erasekit samples and inverts with (DDIM from the pipeline's own config: the
stated default; the folder's scheduler is left in place), the components an edit may change
(`editable_components`) and where the text enters the denoiser (`attention_sites`). `family_of(pipe)` is the one
detection function; a new family is one class registered with `register_family`.

`SD3Family` (`erasekit.diffusion.sd3`) and `FluxFamily` (`erasekit.diffusion.flux`) are the flow-matching
transformer families (`erasekit.diffusion.flow`); `SDFamily` (`erasekit.diffusion.family_base`) covers SD-1.x (CLIP ViT-L, 768-d), SD-2.x (OpenCLIP, 1024-d, v-prediction) and the embedded world
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

import torch

from erasekit.diffusion.conditioning import Conditioning
from erasekit.diffusion.family_base import SD, SDFamily, _encode_prefixed
from erasekit.diffusion.flux import FLUX
from erasekit.diffusion.sd3 import SD3
from erasekit.diffusion.transfer import to_device
from erasekit.errors import ErasekitError

__all__ = ["SDFamily", "SDXLFamily", "SD", "SDXL", "SD3", "FLUX", "FAMILIES", "register_family", "family_of",
           "is_sdxl"]


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
        h, w = size if size is not None else self.image_size(pipe)
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


SDXL = SDXLFamily()
# Every family, asked in order: the first whose `matches(pipe)` holds owns the pipeline. A new family (one file)
# registers itself with `register_family`, ahead of the ones it specialises.
# SD3 and FLUX.1 come first: their pipelines have a text_encoder_2 too.
FAMILIES: list = [SD3, FLUX, SDXL, SD]


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

"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): an MMDiT transformer on flow matching.

Text: two CLIP encoders with projections (CLIP-L 768, CLIP-G 1280), whose penultimate-layer states are
concatenated (2048) and zero-padded to T5's width (4096), then placed before T5-XXL's states (77 + 256 positions);
the pooled projections of both CLIPs (768 + 1280 = 2048) are the transformer's ``pooled_projections``. Exactly as
`StableDiffusion3Pipeline.encode_prompt` builds them (no clip skip). Classifier-free guidance as in diffusers
([uncond, cond] in one batch, ``u + s (c - u)`` on the velocity). Attention sites: every joint block's text-side
K/V projections (``transformer.joint.<i>.text``: ``transformer_blocks.<i>.attn.add_k_proj`` / ``add_v_proj``).
"""

from __future__ import annotations

import torch

from erasekit.diffusion.conditioning import Conditioning
from erasekit.diffusion.flow import FlowMatchingFamily
from erasekit.diffusion.transfer import to_device

SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length


class SD3Family(FlowMatchingFamily):
    name = "sd3"
    site_kind = "joint"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def matches(self, pipe) -> bool:
        return type(pipe).__name__.startswith("StableDiffusion3") and getattr(pipe, "transformer", None) is not None

    def encoders(self, pipe):
        found = [("clip_l", pipe.tokenizer, pipe.text_encoder), ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)]
        if getattr(pipe, "text_encoder_3", None) is not None:
            found.append(("t5", pipe.tokenizer_3, pipe.text_encoder_3))
        return found

    def image_size(self, pipe) -> tuple[int, int]:
        side = int(pipe.transformer.config.sample_size) * pipe.vae_scale_factor  # diffusers' default_sample_size
        return side, side

    def latent_channels(self, pipe) -> int:
        return int(pipe.transformer.config.in_channels)

    def t5_tokens(self, pipe) -> int:
        tok = getattr(pipe, "tokenizer_3", None)
        return self.t5_length(pipe, tok, SD3_T5_TOKENS) if tok is not None else SD3_T5_TOKENS

    def encode(self, pipe, prompts, device=None, *, tokenizers=None, size=None) -> Conditioning:
        from erasekit.models.prompts import ENCODE_CHUNK, as_list, expand_textual_inversion

        prompts = as_list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode")
        encoders = self.encoders(pipe)
        out_device = torch.device(device) if device is not None else pipe.text_encoder.device
        states_all, pooled_all = [], []
        for i in range(0, len(prompts), ENCODE_CHUNK):
            chunk = prompts[i : i + ENCODE_CHUNK]
            parts, pooled = [], []
            for k, (name, tok, enc) in enumerate(encoders):
                texts = chunk if tokenizers is not None else expand_textual_inversion(pipe, chunk, tok)
                tok = tokenizers[k] if tokenizers is not None else tok
                if name == "t5":
                    ids = tok(texts, padding="max_length", max_length=self.t5_tokens(pipe), truncation=True,
                              add_special_tokens=True, return_tensors="pt").input_ids
                    t5 = enc(to_device(ids, enc.device))[0].to(enc.dtype)
                    continue
                ids = tok(texts, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
                          return_tensors="pt").input_ids
                out = enc(to_device(ids, enc.device), output_hidden_states=True)
                pooled.append(out[0])
                parts.append(out.hidden_states[-2].to(dtype=pipe.text_encoder.dtype))
            if len(encoders) == 2:  # no T5 in the folder: diffusers' zeros
                t5 = torch.zeros(len(chunk), self.t5_tokens(pipe), pipe.transformer.config.joint_attention_dim,
                                 device=parts[0].device, dtype=pipe.text_encoder.dtype)
            clip = torch.cat(parts, dim=-1)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            states_all.append(torch.cat([clip.to(t5.device), t5], dim=-2))
            pooled_all.append(torch.cat(pooled, dim=-1))
        return Conditioning(torch.cat(states_all).to(out_device), {"pooled": torch.cat(pooled_all).to(out_device)})

    def encode_with_prefix(self, pipe, prompts, prefixes, size=None) -> Conditioning:
        """As `encode` with ``prefixes`` (one (B, k, E) per encoder: CLIP-L, CLIP-G, T5) after each CLIP's BOS
        and at T5's first positions (attacks' prefix tokens)."""
        from erasekit.diffusion.family_base import _encode_prefixed
        from erasekit.diffusion.flow import encode_t5_with_prefix

        encoders = self.encoders(pipe)
        if len(prefixes) != len(encoders):
            raise ValueError(f"{len(prefixes)} prefixes for {len(encoders)} text encoders")
        parts, pooled, t5 = [], [], None
        for (name, tok, enc), prefix in zip(encoders, prefixes):
            if name == "t5":
                t5 = encode_t5_with_prefix(tok, enc, prompts, prefix, self.t5_tokens(pipe)).to(enc.dtype)
                continue
            out = _encode_prefixed(tok, enc, prompts, prefix, output_hidden_states=True)
            pooled.append(out[0])
            parts.append(out.hidden_states[-2].to(dtype=pipe.text_encoder.dtype))
        if t5 is None:  # no T5 in the folder: diffusers' zeros
            t5 = torch.zeros(len(parts[0]), self.t5_tokens(pipe), pipe.transformer.config.joint_attention_dim,
                             device=parts[0].device, dtype=pipe.text_encoder.dtype)
        clip = torch.cat(parts, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        device = pipe.text_encoder.device
        return Conditioning(torch.cat([clip.to(t5.device), t5], dim=-2).to(device),
                            {"pooled": torch.cat(pooled, dim=-1).to(device)})

    def denoise(self, model, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        timestep = t.expand(len(x)) if t.ndim == 0 else t
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.states,
                     pooled_projections=cond.added["pooled"], return_dict=False)[0]


SD3 = SD3Family()

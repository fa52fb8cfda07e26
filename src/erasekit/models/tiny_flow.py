"""Tiny randomly initialised SD3- and FLUX.1-shaped pipelines (flow-matching transformers), built from configs.

After diffusers' own fast-test components (tests/pipelines/stable_diffusion_3, tests/pipelines/flux), but with
every tokenizer built offline (no hub download): the CLIP ones of `erasekit.models.tiny`, and a T5 (SentencePiece
Unigram) tokenizer over the same tiny vocabulary. 16x16 latents (4 channels; the real models have 16), 32x32 images.

- SD3: two CLIP encoders with projections (CLIP-L, CLIP-G: widths 16 + 32, their penultimate states concatenated
  and zero-padded to T5's width, 48), a T5 encoder (48), pooled projections 16 + 32 = 48; an `SD3Transformer2DModel`
  of two joint blocks (patch 2); the flow-matching Euler scheduler with SD3's shift 3.
- FLUX.1 (dev-shaped): CLIP-L (32 wide, its pooled output only) and T5 (48); a `FluxTransformer2DModel` with one
  double-stream (joint) and one single-stream block, rotary axes (4, 4, 8), the guidance embedding (FLUX.1-dev's
  distilled guidance); FLUX.1-dev's scheduler config (resolution-dependent shift).

``sd35m_shaped_pipeline`` / ``flux_dev_shaped_pipeline`` have the real transformers' sizes (small text encoders and
VAE), for GPU benchmarks only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from erasekit.models.tiny import (
    EOS,
    TINY_WORDS,
    _cache_root,
    _clip_text_model,
    _clip_text_model_with_projection,
    tiny_clip_tokenizer,
)

T5_MAX_TOKENS = 32  # the tiny T5 tokenizer's window (the real ones: 512; SD3 uses 256 of them, FLUX.1-dev 512)
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                             max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
# SD3 / FLUX VAEs: no quant convolutions, latents shifted and scaled (diffusers' test values).
TINY_FLOW_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                     up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                     latent_channels=4, norm_num_groups=16, sample_size=32, use_quant_conv=False,
                     use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def _t5_vocab(words=TINY_WORDS) -> list[tuple[str, float]]:
    """Unigram pieces: the specials, each word after SentencePiece's word marker, the marker alone, and single
    characters (anything else is spelled out, as T5 does for rare words); scores rank whole words first."""
    pieces = ["\u2581" + w for w in words] + ["\u2581"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()")
    return [(s, 0.0) for s in T5_SPECIALS] + [(p, -float(i + 1)) for i, p in enumerate(dict.fromkeys(pieces))]


def tiny_t5_tokenizer(max_length: int = T5_MAX_TOKENS):
    """An offline T5 tokenizer (SentencePiece Unigram, lower-cased, ``</s>`` appended, ``<pad>`` padding) over the
    tiny vocabulary, written once to a cache folder keyed by its content and loaded with ``from_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import AutoTokenizer, T5TokenizerFast

    vocab = _t5_vocab()
    key = hashlib.sha256(json.dumps([vocab, max_length]).encode()).hexdigest()[:12]
    folder = _cache_root() / f"tiny-t5-tokenizer-{key}"
    if not folder.is_dir():
        tok = Tokenizer(models.Unigram(vocab, unk_id=T5_SPECIALS.index("<unk>"), byte_fallback=False))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", T5_SPECIALS.index("</s>"))])
        fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                               extra_ids=0, model_max_length=max_length)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent))
        fast.save_pretrained(str(tmp))
        try:
            os.replace(tmp, folder)  # atomic: concurrent test workers never see a half-written folder
        except OSError:
            pass  # another process won the race; its folder is identical
    return AutoTokenizer.from_pretrained(str(folder))


def _t5_encoder(tokenizer, d_model: int, layers: int = 2, heads: int = 4, d_ff: int = 37):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
                      num_heads=heads, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(config).eval()


def _flow_vae(**overrides):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**dict(TINY_FLOW_VAE, **overrides)).eval()


def tiny_sd3_pipeline(seed: int = 0):
    """A random `StableDiffusion3Pipeline` of about a million parameters (see the module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    w1, w2, t5 = 16, 32, 48
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=t5, caption_projection_dim=32, pooled_projection_dim=w1 + w2,
        pos_embed_max_size=16,
    ).eval()
    vae = _flow_vae()
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(pad_token=EOS), tiny_clip_tokenizer(pad_token="!")
    tokenizer_3 = tiny_t5_tokenizer()
    text_encoder = _clip_text_model_with_projection(tokenizer, hidden=w1, layers=2, heads=4, intermediate=37,
                                                    projection=w1)
    text_encoder_2 = _clip_text_model_with_projection(tokenizer_2, hidden=w2, layers=2, heads=4, intermediate=37,
                                                      projection=w2)
    text_encoder_3 = _t5_encoder(tokenizer_3, t5)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A random `FluxPipeline` (FLUX.1-dev-shaped with ``guidance_embeds``, schnell-shaped without)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    clip, t5 = 32, 48
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=t5, pooled_projection_dim=clip, axes_dims_rope=(4, 4, 8), guidance_embeds=guidance_embeds,
    ).eval()
    vae = _flow_vae()
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(pad_token=EOS), tiny_t5_tokenizer()
    text_encoder = _clip_text_model(tokenizer, hidden=clip, layers=2, heads=4, intermediate=37)
    text_encoder_2 = _t5_encoder(tokenizer_2, t5)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_flow_pipeline(kind: str, folder, seed: int = 0) -> Path:
    """Write a tiny "sd3" or "flux" pipeline as a diffusers folder (safetensors), loadable by path."""
    builders = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
    if kind not in builders:
        raise ValueError(f"kind must be one of {sorted(builders)}, not {kind!r}")
    folder = Path(folder)
    builders[kind](seed=seed).save_pretrained(str(folder), safe_serialization=True)
    return folder


# -- real transformer sizes, random weights (GPU benchmarks) ----------------------------------------------------
SD35M_TRANSFORMER_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)
FLUX_DEV_TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56), guidance_embeds=True,
)
FLOW_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                       layers_per_block=2, latent_channels=16, sample_size=1024, use_quant_conv=False,
                       use_post_quant_conv=False)


def sd35m_shaped_pipeline(seed: int = 0, device=None, dtype=None, t5_width: int = 4096, t5_layers: int = 2):
    """SD3.5-medium's transformer and VAE sizes with random weights; small text encoders of the real widths
    (CLIP-L 768, CLIP-G 1280, T5 4096, few layers): generation cost is the transformer's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**SD35M_TRANSFORMER_CONFIG).eval()
    vae = _flow_vae(**FLOW_VAE_CONFIG, scaling_factor=1.5305, shift_factor=0.0609, norm_num_groups=32)
    tok, tok2, tok3 = tiny_clip_tokenizer(pad_token=EOS), tiny_clip_tokenizer(pad_token="!"), tiny_t5_tokenizer(512)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG), vae=vae,
        text_encoder=_clip_text_model_with_projection(tok, 768, 2, 12, 3072, 768), tokenizer=tok,
        text_encoder_2=_clip_text_model_with_projection(tok2, 1280, 2, 20, 5120, 1280), tokenizer_2=tok2,
        text_encoder_3=_t5_encoder(tok3, t5_width, layers=t5_layers, heads=64, d_ff=10240), tokenizer_3=tok3,
    )
    pipe.set_progress_bar_config(disable=True)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe


def flux_dev_shaped_pipeline(seed: int = 0, device=None, dtype=None, t5_width: int = 4096, t5_layers: int = 2):
    """FLUX.1-dev's transformer (12B) and VAE sizes with random weights; small text encoders of the real widths."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER_CONFIG).eval()
    vae = _flow_vae(**FLOW_VAE_CONFIG, scaling_factor=0.3611, shift_factor=0.1159, norm_num_groups=32)
    tok, tok2 = tiny_clip_tokenizer(pad_token=EOS), tiny_t5_tokenizer(512)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG), vae=vae,
        text_encoder=_clip_text_model(tok, 768, 2, 12, 3072), tokenizer=tok,
        text_encoder_2=_t5_encoder(tok2, t5_width, layers=t5_layers, heads=64, d_ff=10240), tokenizer_2=tok2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe

"""Tiny randomly initialised Stable-Diffusion-shaped pipelines, built from configs (no download).

They exercise the code paths of real checkpoints in tests: CLIP tokenizer and text model, cross-attention
widths of SD-1.x (768) and SD-2.x (1024, linear projections, per-block head counts), SDXL's two text encoders
(penultimate states concatenated, the second one's pooled projection and the time ids as added conditioning), a
KL autoencoder and SD's noise schedule. ``sd14_unet`` / ``sd14_shaped_pipeline`` and ``sdxl_shaped_pipeline`` have
the real models' full sizes, for GPU benchmarks only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

# Words that get whole-word BPE tokens; anything else is spelled out in single characters, as CLIP
# does for rare words.
TINY_WORDS = (
    "a an the of on in with and photo picture painting style by drawing image "
    "red green blue yellow purple orange white black "
    "circle square triangle star heart cross starfish pentagram "
    "plain striped dotted checkered background shape coloured colored "
    "nude naked person man woman dog cat car church van gogh"
).split()
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 77

SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

# The UNet of SD-1.4/1.5 (diffusers' defaults plus cross_attention_dim 768): 16 cross-attention layers.
SD14_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD14_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Standard BPE: repeatedly merge the adjacent pair with the lowest merge rank."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return parts


def _tiny_bpe(words=TINY_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style byte-level BPE vocabulary: every byte alone and word-final ("x</w>"), plus merges that make
    each of ``words`` one token. Each word's new merges join, left to right, the pieces the earlier merges
    leave, and rank after them, so earlier words keep their tokens."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            ranks.setdefault((parts[0], parts[1]), len(ranks))
            tokens.append(parts[0] + parts[1])
            parts = [parts[0] + parts[1]] + parts[2:]
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    return {t: i for i, t in enumerate(tokens)}, merges


def _cache_root() -> Path:
    return Path(os.environ.get("ERASEKIT_CACHE", Path(tempfile.gettempdir()) / "erasekit-cache"))


def tiny_clip_tokenizer(pad_token: str = EOS):
    """An offline `CLIPTokenizer` over the tiny vocabulary (SD-1 pads with EOS, SD-2 with "!").

    transformers 5 ignores ``vocab_file=`` arguments, so the files are written to a cache folder (keyed by
    their content) and loaded with ``from_pretrained``.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _tiny_bpe()
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(
            dict(model_max_length=MAX_TOKENS, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=pad_token)
        ),
    }
    key = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
    folder = _cache_root() / f"tiny-clip-tokenizer-{key}"
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent))
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        try:
            os.replace(tmp, folder)  # atomic: concurrent test workers never see a half-written folder
        except OSError:
            pass  # another process won the race; its folder is identical
    return CLIPTokenizer.from_pretrained(str(folder))


def _clip_text_model(tokenizer, hidden: int, layers: int, heads: int, intermediate: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _assemble(unet, vae, text_encoder, tokenizer, prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG, prediction_type=prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(variant: str = "sd1", seed: int = 0, prediction_type: str = "epsilon"):
    """A random pipeline of a few million parameters shaped like SD-1.x ("sd1", text width 768), SD-2.x ("sd2",
    1024) or SDXL ("sdxl": see `tiny_sdxl_pipeline`).

    UNet: 2 levels (32, 64 channels), cross-attention at the 8x8 level and in the middle (4 attn2 layers);
    16x16 latents; VAE factor 2, so images are 32x32.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if variant == "sdxl":
        return tiny_sdxl_pipeline(seed=seed, prediction_type=prediction_type)
    if variant not in ("sd1", "sd2"):
        raise ValueError(f"variant must be 'sd1', 'sd2' or 'sdxl', not {variant!r}")
    sd2 = variant == "sd2"
    width = 1024 if sd2 else 768
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width,
        # SD-2 lists heads per block and projects with Linear layers instead of 1x1 convolutions.
        attention_head_dim=(2, 4) if sd2 else 4,
        use_linear_projection=sd2,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    tokenizer = tiny_clip_tokenizer(pad_token="!" if sd2 else EOS)
    text_encoder = _clip_text_model(tokenizer, hidden=width, layers=1, heads=16 if sd2 else 12, intermediate=64)
    return _assemble(unet, vae, text_encoder, tokenizer, prediction_type)


def sd14_unet(seed: int = 0, device=None, dtype=None):
    """A randomly initialised UNet with SD-1.4's exact architecture (860M parameters, 16 cross-attention layers).

    Build it under ``torch.device("meta")`` to inspect its structure without allocating memory.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD14_UNET_CONFIG).eval()
    return unet.to(device=device, dtype=dtype) if device is not None or dtype is not None else unet


def sd14_shaped_pipeline(text_layers: int = 12, seed: int = 0, device=None, dtype=None):
    """A random pipeline with SD-1.4's UNet, VAE and text-model widths (tiny vocabulary), for benchmarks."""
    from diffusers import AutoencoderKL

    unet = sd14_unet(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**SD14_VAE_CONFIG)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = _clip_text_model(tokenizer, hidden=768, layers=text_layers, heads=12, intermediate=3072)
    pipe = _assemble(unet, vae, text_encoder, tokenizer)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe


# SDXL's scheduler (EulerDiscrete in the checkpoint; erasekit samples with DDIM from the same schedule).
SDXL_SCHEDULER_CONFIG = dict(SD_SCHEDULER_CONFIG, timestep_spacing="leading")
TINY_SDXL_WIDTHS = (32, 64)  # the two encoders' widths (SDXL: 768 + 1280 = 2048); pooled = projection of the second


def _clip_text_model_with_projection(tokenizer, hidden: int, layers: int, heads: int, intermediate: int,
                                     projection: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=MAX_TOKENS, hidden_act="gelu", projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def _assemble_xl(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet.eval(),
        scheduler=DDIMScheduler(**SDXL_SCHEDULER_CONFIG, prediction_type=prediction_type),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A random SDXL-shaped pipeline (after diffusers' own SDXL test components): two CLIP encoders of widths 32
    and 64 (text states 96 wide; SDXL: 768 + 1280 = 2048), the second with a 32-d pooled projection, a UNet with
    ``addition_embed_type="text_time"`` (time ids embedded 8-d each: 6 * 8 + 32 = 80 inputs), linear projections,
    two transformer layers at the 8x8 level; SDXL's tokenizers (the first pads with EOS, the second with "!").
    16x16 latents, 32x32 images; a few seconds per test on a CPU.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    w1, w2 = TINY_SDXL_WIDTHS
    pooled, time_dim = 32, 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled, cross_attention_dim=w1 + w2, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=16, sample_size=32, scaling_factor=0.13025, force_upcast=True,
    )
    tokenizer = tiny_clip_tokenizer(pad_token=EOS)
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")
    text_encoder = _clip_text_model(tokenizer, hidden=w1, layers=2, heads=4, intermediate=64)
    text_encoder_2 = _clip_text_model_with_projection(tokenizer_2, hidden=w2, layers=2, heads=4, intermediate=64,
                                                      projection=pooled)
    return _assemble_xl(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, prediction_type)


# SDXL-base-1.0's UNet (2.6B parameters): 70 cross-attention layers, text width 2048, pooled 1280.
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    cross_attention_dim=2048,
)
SDXL_VAE_CONFIG = dict(SD14_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=True)


def sdxl_shaped_pipeline(text_layers: tuple[int, int] = (12, 32), seed: int = 0, device=None, dtype=None):
    """A random pipeline with SDXL-base's UNet, VAE and text-model widths (tiny vocabulary), for GPU benchmarks."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).eval()
    vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    tokenizer = tiny_clip_tokenizer(pad_token=EOS)
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")
    text_encoder = _clip_text_model(tokenizer, hidden=768, layers=text_layers[0], heads=12, intermediate=3072)
    text_encoder_2 = _clip_text_model_with_projection(tokenizer_2, hidden=1280, layers=text_layers[1], heads=20,
                                                      intermediate=5120, projection=1280)
    pipe = _assemble_xl(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe

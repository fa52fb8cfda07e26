"""Randomly initialised judge models built from configs and saved as transformers folders (no download).

Tests load them by path exactly as a user's openai/clip-vit-large-patch14, microsoft/resnet-50 or
facebook/dinov2-* folder would be loaded; ``shape="full"`` builds the real architectures' sizes (ViT-L/14 CLIP,
ResNet-50, DINOv2 ViT-B/14) for speed benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def clip_folder(folder, shape: str = "tiny", seed: int = 0, image_size: int | None = None) -> Path:
    """A CLIPModel + the offline tiny CLIP tokenizer + a CLIP image-processor config, saved to ``folder``."""
    from transformers import CLIPConfig, CLIPModel

    from erasekit.models.tiny import MAX_TOKENS, tiny_clip_tokenizer

    folder = Path(folder)
    tok = tiny_clip_tokenizer()
    ids = dict(vocab_size=len(tok), max_position_embeddings=MAX_TOKENS, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if shape == "full":  # ViT-L/14 (openai/clip-vit-large-patch14)
        size = image_size or 224
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, **ids)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=size, patch_size=14)
        projection = 768
    else:
        size = image_size or 32
        text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, **ids)
        vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      image_size=size, patch_size=8)
        projection = 16
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)).eval()
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    _write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "do_convert_rgb": True})
    return folder


def resnet_folder(folder, shape: str = "tiny", labels=None, seed: int = 0) -> Path:
    """A ResNetForImageClassification (ResNet-50 when ``shape="full"``) with ``labels`` as its id2label."""
    from transformers import ResNetConfig, ResNetForImageClassification

    folder = Path(folder)
    labels = list(labels or ["tench, Tinca tinca", "church, church building", "golf ball", "parachute, chute"])
    id2label = {i: name for i, name in enumerate(labels)}
    arch = {} if shape == "full" else dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=3, num_labels=len(labels), id2label=id2label,
                          label2id={v: k for k, v in id2label.items()}, **arch)
    ResNetForImageClassification(config).eval().save_pretrained(str(folder))
    size = 224 if shape == "full" else 32
    _write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "ConvNextImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "crop_pct": 0.875, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD})
    return folder


def dinov2_folder(folder, shape: str = "tiny", seed: int = 0) -> Path:
    """A Dinov2Model (ViT-B/14 when ``shape="full"``) with a BiT-style processor config (resize, crop 224)."""
    from transformers import Dinov2Config, Dinov2Model

    folder = Path(folder)
    if shape == "full":
        config = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=518,
                              patch_size=14)
        size, crop = 256, 224
    else:
        config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                              image_size=32, patch_size=8)
        size = crop = 32
    torch.manual_seed(seed)
    Dinov2Model(config).eval().save_pretrained(str(folder))
    _write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "do_center_crop": True, "crop_size": {"height": crop, "width": crop}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD})
    return folder

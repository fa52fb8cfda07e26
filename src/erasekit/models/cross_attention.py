"""Find the cross-attention layers of a UNet: the K/V projections of the text states.

Closed-form erasers (UCE, RECE), ESD-x and attention probes all act on these; in diffusers they are the
``attn2`` Attention modules of every transformer block (``attn1`` is self-attention).
"""

from __future__ import annotations

import torch


def cross_attention_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every cross-attention ``Attention`` module (``...attn2``) with its name, in module order."""
    found = []
    for name, module in unet.named_modules():
        if name.endswith("attn2") and getattr(module, "is_cross_attention", False):
            found.append((name, module))
    return found


def cross_attention_kv(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """Every ``attn2.to_k`` and ``attn2.to_v`` projection (name, Linear), in module order (k before v)."""
    layers = []
    for name, attn in cross_attention_modules(unet):
        layers.append((f"{name}.to_k", attn.to_k))
        layers.append((f"{name}.to_v", attn.to_v))
    return layers


def text_width(unet: torch.nn.Module) -> int:
    """The width of the text states the UNet attends to (768 for SD-1.x, 1024 for SD-2.x, 384 for the toy)."""
    dim = unet.config.cross_attention_dim
    if isinstance(dim, (list, tuple)):
        if len(set(dim)) != 1:
            raise ValueError(f"UNet has per-block cross_attention_dim {dim}; erasekit expects one text width")
        dim = dim[0]
    return int(dim)

"""Find the cross-attention layers of a UNet: the K/V projections of the text states.

Closed-form erasers (UCE, RECE), ESD-x and attention probes all act on these; in diffusers they are the
``attn2`` Attention modules of every transformer block (``attn1`` is self-attention). They are the UNet
families' attention sites (`erasekit.diffusion.sites`), under their module paths.
"""

from __future__ import annotations

import torch


def cross_attention_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every cross-attention ``Attention`` module (``...attn2``) with its module path, in module order (the UNet's
    attention sites, `erasekit.diffusion.sites`)."""
    from erasekit.diffusion.sites import unet_cross_attention_sites

    return [(site.path, site.module) for site in unet_cross_attention_sites(unet)]


def cross_attention_kv(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """Every ``attn2.to_k`` and ``attn2.to_v`` projection (name, Linear), in module order (k before v)."""
    from erasekit.diffusion.sites import unet_cross_attention_sites

    return [(f"{site.path}.{kind}", proj) for site in unet_cross_attention_sites(unet)
            for kind, proj in (("to_k", site.key), ("to_v", site.value))]


def text_width(unet: torch.nn.Module) -> int:
    """The width of the text states the UNet attends to (768 for SD-1.x, 1024 for SD-2.x, 384 for the toy)."""
    dim = unet.config.cross_attention_dim
    if isinstance(dim, (list, tuple)):
        if len(set(dim)) != 1:
            raise ValueError(f"UNet has per-block cross_attention_dim {dim}; erasekit expects one text width")
        dim = dim[0]
    return int(dim)

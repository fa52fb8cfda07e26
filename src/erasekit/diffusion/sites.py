"""Named attention sites: the places where a model's denoiser attends to the text, under one naming scheme.

A site names one attention module that reads text states (TransformerLens-style dotted names, stable across
runs and independent of diffusers' module paths): ``unet.down.1.0.0.cross`` is the cross-attention of
``down_blocks.1.attentions.0.transformer_blocks.0.attn2``. Attention capture, IRECE's mask and the K/V edits
(UCE, RECE, ESD-x) all find their layers here, through the model family (`family.attention_sites(pipe)`), so a
family whose text enters elsewhere (a joint-attention transformer's ``add_k_proj`` / ``add_v_proj``) gives its own
sites and every method follows.

A selection is a list of site names, module paths or parts of either (``"up"``, ``"mid"``, ``"down.1"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

_BLOCKS = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}


@dataclass(frozen=True)
class AttentionSite:
    name: str  # e.g. "unet.down.1.0.0.cross"
    component: str  # the pipeline component holding it ("unet")
    path: str  # the module path inside the component ("down_blocks.1.attentions.0.transformer_blocks.0.attn2")
    module: torch.nn.Module
    key: torch.nn.Linear  # the projection of the text states to keys
    value: torch.nn.Linear  # ... and to values
    key_attr: str = "to_k"  # their attribute names on the module (joint attention: add_k_proj / add_v_proj)
    value_attr: str = "to_v"

    def kv(self) -> list[tuple[str, torch.nn.Linear]]:
        """(qualified parameter prefix, projection) for the key, then the value."""
        return [(f"{self.component}.{self.path}.{self.key_attr}", self.key),
                (f"{self.component}.{self.path}.{self.value_attr}", self.value)]


def site_name(component: str, path: str, kind: str = "cross") -> str:
    """The short name of a UNet attention module path: block kind, block index, attention and transformer index."""
    parts = path.split(".")
    short = [_BLOCKS.get(parts[0], parts[0])] + [p for p in parts[1:] if p.isdigit()]
    return ".".join([component, *short, kind])


def unet_cross_attention_sites(unet: torch.nn.Module, component: str = "unet") -> list[AttentionSite]:
    """Every cross-attention module (``...attn2`` with ``is_cross_attention``) of a UNet, in module order."""
    sites = []
    for path, module in unet.named_modules():
        if path.endswith("attn2") and getattr(module, "is_cross_attention", False):
            sites.append(AttentionSite(site_name(component, path), component, path, module, module.to_k, module.to_v))
    return sites


def joint_attention_sites(transformer: torch.nn.Module, kind: str = "joint",
                          component: str = "transformer") -> list[AttentionSite]:
    """The text side of every joint-attention block of an SD3 / FLUX transformer, in block order:
    ``transformer_blocks.<i>.attn``'s ``add_k_proj`` / ``add_v_proj``, the projections of the text stream to keys
    and values (``transformer.joint.<i>.text`` for SD3, ``transformer.double.<i>.text`` for FLUX's double-stream
    blocks; FLUX's single-stream blocks project text and image together and give no site)."""
    sites = []
    for i, block in enumerate(getattr(transformer, "transformer_blocks", [])):
        attn = getattr(block, "attn", None)
        if attn is None or getattr(attn, "add_k_proj", None) is None:
            continue
        sites.append(AttentionSite(f"{component}.{kind}.{i}.text", component, f"transformer_blocks.{i}.attn", attn,
                                   attn.add_k_proj, attn.add_v_proj, "add_k_proj", "add_v_proj"))
    return sites


@dataclass(frozen=True)
class ImageTextAttention:
    """An attention module of a joint-attention transformer where image queries attend to text keys."""

    name: str  # "transformer.joint.0.text" (the block's K/V site name), or "transformer.single.<i>" (FLUX)
    path: str  # the module path inside the transformer
    module: torch.nn.Module
    layout: str  # "image_first" (SD3: [image; text]), "text_first" (FLUX double), "single" (FLUX: one stream)


def image_text_attention(transformer: torch.nn.Module, component: str = "transformer") -> list[ImageTextAttention]:
    """Every attention of an SD3 / FLUX transformer in which image queries see the text: the joint blocks (the
    text keys from ``add_k_proj``), and FLUX's single-stream blocks (one projection of [text; image]), in call order.
    What IRECE's mask reads (`erasekit.diffusion.attention.capture_joint_attention`)."""
    transformer = getattr(transformer, "_orig_mod", transformer)  # a torch.compile wrapper: its module
    flux = "Flux" in type(transformer).__name__
    kind = "double" if flux else "joint"
    found = [ImageTextAttention(site.name, site.path, site.module, "text_first" if flux else "image_first")
             for site in joint_attention_sites(transformer, kind, component)]
    for i, block in enumerate(getattr(transformer, "single_transformer_blocks", None) or []):
        attn = getattr(block, "attn", None)
        if attn is not None:
            found.append(ImageTextAttention(f"{component}.single.{i}", f"single_transformer_blocks.{i}.attn", attn,
                                            "single"))
    return found


def select_sites(sites: Sequence[AttentionSite], selection: Iterable[str] | None) -> list[AttentionSite]:
    """The sites a selection names (None: all); a selection that names none is an error."""
    if selection is None:
        return list(sites)
    wanted = [str(s) for s in selection]
    chosen = [s for s in sites if any(w == s.name or w == s.path or w in s.name or w in s.path for w in wanted)]
    if not chosen:
        raise ValueError(f"no attention site matches {wanted} (sites: {', '.join(s.name for s in sites[:4])}, ...)")
    return chosen

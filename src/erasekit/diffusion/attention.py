"""Cross-attention capture: where in the latent a UNet looks at chosen text tokens.

    with capture_cross_attention(pipe.unet, token_positions=[1]) as cap:
        pipe.unet(x, t, encoder_hidden_states=states)
    maps = cap.aggregate((h, w))      # (B, h, w): mean over layers, heads and the chosen tokens

An attention processor is installed on every cross-attention site (`erasekit.diffusion.sites`)
for the block. It calls the module's own processor for the output (so the UNet's output is exactly what it would
be without the capture) and, beside it, computes the softmax attention probabilities ``softmax(q k^T / sqrt(d))``
of the module's queries against the text keys, keeping, per layer and per call, the mean over heads of the chosen
token positions' columns (B, T_chosen, N). The original processors are always restored on exit, also when the
block raises.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable

import torch
import torch.nn.functional as F


class _Recorder:
    """Maps recorded during one `capture_cross_attention` block."""

    def __init__(self, token_positions):
        self.token_positions = None if token_positions is None else [int(p) for p in token_positions]
        self.records: list[tuple[str, torch.Tensor]] = []  # (layer name, (B, T_chosen, N)) in call order

    def clear(self) -> None:
        self.records.clear()

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.records))

    def aggregate(self, size: tuple[int, int], per_token: bool = False) -> torch.Tensor:
        """Every recorded map at latent resolution ``size`` (h, w), averaged over layers and calls.

        (B, h, w) (mean over the chosen tokens too), or (B, T_chosen, h, w) with ``per_token``."""
        if not self.records:
            raise RuntimeError("no cross-attention was recorded (did the UNet run inside the block?)")
        h, w = int(size[0]), int(size[1])
        total = None
        for _, probs in self.records:
            m = _to_grid(probs.float(), h, w)
            total = m if total is None else total + m
        out = total / len(self.records)
        return out if per_token else out.mean(1)


def _to_grid(probs: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, T, N) probabilities of one layer -> (B, T, h, w), the layer's grid resized to the latent's."""
    b, t, n = probs.shape
    f = math.sqrt(h * w / n)  # the layer's downsampling factor
    for hl, wl in ((round(h / f), round(w / f)), (math.ceil(h / f), math.ceil(w / f)),
                   (math.floor(h / f), math.floor(w / f))):
        if hl * wl == n:
            break
    else:
        raise ValueError(f"cannot place {n} attention queries on a grid of aspect {h}x{w}")
    grid = probs.reshape(b, t, hl, wl)
    if (hl, wl) == (h, w):
        return grid
    if hl >= h and wl >= w:  # finer than the latent: average
        return F.adaptive_avg_pool2d(grid, (h, w))
    return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)


class _CaptureProcessor:
    """The module's own processor for the output, plus the attention probabilities of chosen tokens."""

    def __init__(self, original, name: str, recorder: _Recorder):
        self.original = original
        self.name = name
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if encoder_hidden_states is not None:
            self._record(attn, hidden_states, encoder_hidden_states, attention_mask)
        return out

    def _record(self, attn, hidden_states, encoder_hidden_states, attention_mask) -> None:
        x = hidden_states
        if x.ndim == 4:  # (B, C, H, W) -> (B, HW, C)
            b, c, hh, ww = x.shape
            x = x.view(b, c, hh * ww).transpose(1, 2)
        if getattr(attn, "group_norm", None) is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        enc = encoder_hidden_states
        if getattr(attn, "norm_cross", None):
            enc = attn.norm_encoder_hidden_states(enc)
        b = x.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(x))
        key = attn.head_to_batch_dim(attn.to_k(enc))
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, enc.shape[1], b)
        probs = attn.get_attention_scores(query, key, mask)  # (B*heads, N, T), batch-major
        probs = probs.reshape(b, -1, *probs.shape[1:]).mean(1)  # mean over heads: (B, N, T)
        pos = self.recorder.token_positions
        if pos is not None:
            probs = probs[..., pos]
        self.recorder.records.append((self.name, probs.transpose(1, 2).detach().float()))


@contextmanager
def capture_cross_attention(unet, token_positions: list[int] | None, layers: Iterable[str] | None = None):
    """Record cross-attention probabilities of ``token_positions`` (None: every token) for the block.

    ``layers``: attention sites to record (`erasekit.diffusion.sites`: site names such as ``"unet.up.1.0.0.cross"``,
    module paths, or parts of either such as ``"up"``; default: all). Yields the recorder (`_Recorder.aggregate`). The UNet's processors are restored on exit, also
    when the block raises.
    """
    from erasekit.diffusion.sites import select_sites, unet_cross_attention_sites

    recorder = _Recorder(token_positions)
    original = dict(unet.attn_processors)
    chosen = {site.path for site in select_sites(unet_cross_attention_sites(unet), layers)}
    installed = {}
    for key, proc in original.items():
        module_name = key[: -len(".processor")] if key.endswith(".processor") else key
        installed[key] = _CaptureProcessor(proc, module_name, recorder) if module_name in chosen else proc
    unet.set_attn_processor(dict(installed))  # diffusers pops from the dict it is given
    try:
        yield recorder
    finally:
        unet.set_attn_processor(dict(original))

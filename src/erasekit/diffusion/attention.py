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

SD3 / FLUX.1 have no cross-attention: text and image attend jointly. `capture_joint_attention` records the same
maps there, the text-to-image part of each joint attention (the image queries' softmax over all keys, image and
text, restricted to the chosen text columns), through forward hooks that only read the module's inputs.
"""

from __future__ import annotations

import math
import weakref
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


# Capture processors kept per UNet (`capture_cross_attention(reuse=True)`): the same objects on every call, so that a
# compiled UNet traces the capturing variant once and finds it again (a new processor object is a new graph).
_REUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_ACTIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # unet -> the reused capture installed now


def capture_variant(unet):
    """The reused capture installed on ``unet`` now (None: its own processors): the fast UNet keeps the batch
    sizes it compiled apart per variant, so that a capturing call is never padded to another graph's size."""
    return _ACTIVE.get(unet)


@contextmanager
def capture_cross_attention(unet, token_positions: list[int] | None, layers: Iterable[str] | None = None,
                            reuse: bool = False):
    """Record cross-attention probabilities of ``token_positions`` (None: every token) for the block.

    ``layers``: attention sites to record (`erasekit.diffusion.sites`: site names such as ``"unet.up.1.0.0.cross"``,
    module paths, or parts of either such as ``"up"``; default: all). Yields the recorder (`_Recorder.aggregate`).
    The UNet's processors are restored on exit, also when the block raises.

    ``reuse``: install the processors (and recorder, emptied) of an earlier block with the same positions and layers
    over the same processors, instead of new ones. A compiled UNet (`erasekit.diffusion.speed`) called inside the
    block then records without a graph break (the recorder's appends replay after the graph) and compiles the
    capturing variant once, not once per block. The recorder is the block's only until the next one.
    """
    from erasekit.diffusion.sites import select_sites, unet_cross_attention_sites

    original = dict(unet.attn_processors)
    key = (None if token_positions is None else tuple(int(p) for p in token_positions),
           None if layers is None else tuple(layers))
    entry = _REUSED.get(unet, {}).get(key) if reuse else None
    if entry is not None and all(entry[0].get(k) is v for k, v in original.items()) and len(entry[0]) == len(original):
        installed, recorder = entry[1], entry[2]
        recorder.clear()
    else:
        recorder = _Recorder(token_positions)
        chosen = {site.path for site in select_sites(unet_cross_attention_sites(unet), layers)}
        installed = {}
        for name, proc in original.items():
            module_name = name[: -len(".processor")] if name.endswith(".processor") else name
            installed[name] = _CaptureProcessor(proc, module_name, recorder) if module_name in chosen else proc
        if reuse:
            _REUSED.setdefault(unet, {})[key] = (original, installed, recorder)
    unet.set_attn_processor(dict(installed))  # diffusers pops from the dict it is given
    if reuse:
        _ACTIVE[unet] = key
    try:
        yield recorder
    finally:
        _ACTIVE.pop(unet, None)
        unet.set_attn_processor(dict(original))


# -- joint attention (SD3, FLUX.1): the text-to-image part --------------------------------------------------------
_SCORE_ELEMENTS = 1 << 25  # float32 scores computed at once (heads are taken in chunks below this)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads * d) -> (B, L, heads, d)."""
    return x.unflatten(-1, (heads, -1))


def _norm(attn, name: str, x: torch.Tensor) -> torch.Tensor:
    """The module's q/k norm on (B, L, H, d) (over d: SD3's processor applies it on (B, H, L, d), the same)."""
    norm = getattr(attn, name, None)
    return x if norm is None else norm(x)


def joint_text_probs(attn, layout: str, hidden_states, encoder_hidden_states=None, image_rotary_emb=None,
                     text_len: int | None = None, token_positions=None) -> torch.Tensor:
    """The attention probabilities of every image query over the chosen text keys in one joint attention, mean over
    heads: (B, T_chosen, N_image).

    The softmax runs over ALL keys (image and text), as the module's own attention does; only the text columns are
    kept. ``layout``: "image_first" (SD3's JointAttnProcessor2_0: [image; text]), "text_first" (FLUX's double-stream
    blocks: [text; image], rotary embeddings on both), "single" (FLUX's single-stream blocks: ``hidden_states`` is
    [text; image] with ``text_len`` text positions). ``token_positions`` index the text sequence (None: all)."""
    heads = int(attn.heads)
    q = _norm(attn, "norm_q", _heads(attn.to_q(hidden_states), heads))
    k = _norm(attn, "norm_k", _heads(attn.to_k(hidden_states), heads))
    if layout == "single":
        t_len = int(text_len)
    else:
        eq = _norm(attn, "norm_added_q", _heads(attn.add_q_proj(encoder_hidden_states), heads))
        ek = _norm(attn, "norm_added_k", _heads(attn.add_k_proj(encoder_hidden_states), heads))
        t_len = encoder_hidden_states.shape[1]
        if layout == "image_first":
            q, k = torch.cat([q, eq], 1), torch.cat([k, ek], 1)
        else:
            q, k = torch.cat([eq, q], 1), torch.cat([ek, k], 1)
    if image_rotary_emb is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
    n_all = q.shape[1]
    n_img = n_all - t_len
    img_q = q[:, :n_img] if layout == "image_first" else q[:, t_len:]
    text0 = n_img if layout == "image_first" else 0  # where the text keys start
    cols = torch.arange(t_len) if token_positions is None else torch.as_tensor(list(token_positions))
    cols = (cols + text0).to(q.device)
    b, _, _, d = q.shape
    img_q, k = img_q.transpose(1, 2).float(), k.transpose(1, 2).float()  # (B, H, L, d)
    total = torch.zeros(b, len(cols), n_img, device=q.device)
    step = max(1, _SCORE_ELEMENTS // max(1, b * n_img * n_all))
    for h in range(0, heads, step):
        scores = img_q[:, h : h + step] @ k[:, h : h + step].transpose(-1, -2) / math.sqrt(d)  # SDPA's default scale
        total += scores.softmax(-1)[..., cols].sum(1).transpose(1, 2)
    return total / heads


@contextmanager
def capture_joint_attention(transformer, token_positions: list[int] | None, layers: Iterable[str] | None = None):
    """`capture_cross_attention` for SD3 / FLUX.1 transformers: records, per joint attention, the image queries'
    attention probabilities over the chosen text positions (`joint_text_probs`); FLUX's single-stream blocks too
    (their text length is the double-stream blocks' text length of the same call). ``layers``: names from
    `erasekit.diffusion.sites.image_text_attention` (``"transformer.joint.0.text"``, ``"single"``, ...; default:
    all). The transformer's output is untouched (forward hooks only read the inputs); hooks are removed on exit,
    also when the block raises."""
    from erasekit.diffusion.sites import image_text_attention, select_sites

    recorder = _Recorder(token_positions)
    every = image_text_attention(transformer)
    chosen = {m.path for m in select_sites(every, layers)}
    text_len: list[int] = [0]

    def hook_for(site):
        def hook(module, args, kwargs, output):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            if enc is not None:
                text_len[0] = int(enc.shape[1])
            if site.path not in chosen:
                return
            with torch.no_grad():
                probs = joint_text_probs(module, site.layout, hidden, enc, kwargs.get("image_rotary_emb"),
                                         text_len[0], recorder.token_positions)
            recorder.records.append((site.name, probs.detach().float()))

        return hook

    handles = []
    try:
        for site in every:
            handles.append(site.module.register_forward_hook(hook_for(site), with_kwargs=True))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()

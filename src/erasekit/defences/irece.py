"""IRECE, Inference-time Robustness Enhancement for Concept Erasure (Weng, Liao, Chou, Chen; arXiv 2512.22877):
localise the concept with the ORIGINAL model's cross-attention and perturb the latents there while denoising, so
that the concept cannot form even when the input (an inverted latent, a learned embedding, an empty prompt) carries
it. Training-free and prompt-free: it works on any batch, text, learned embeddings or given states alike.

No public code; our choices, all settings. At each step i with ``start <= i / steps < stop``:

1. Localise (hook ``before``): with the unedited weights (``target.without_edits()``) the UNet runs once on the
   step's latent x_t conditioned on the concept's text (``concept``); the cross-attention probabilities of the
   concept's word tokens (`erasekit.diffusion.attention`), averaged over layers, heads and tokens at the latent's
   resolution, give a map per image. The mask is 1 where the map is at least ``mask_threshold`` x its maximum
   (``mask=threshold``), or on the ``top_k`` share of the latent's positions with the highest attention
   (``mask=top_k``); it covers every latent channel.
2. Perturb (hook ``after``), with c = strength x mask, on the step's prediction x0 and its implied noise
   eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t):
   - ``guide``: x0 <- x0 + c (x0_guide - x0), x0_guide the x0 the target (with its edits) predicts at x_t for the
     world's guide text (neutral, e.g. "an empty background"; "" for Stable Diffusion), conditional only;
   - ``noise``: eps <- sqrt(1 - c^2) eps + c n, n fresh standard noise seeded per image from the batch's seeds and
     the step (deterministic, independent of batching), so the noise level of the step is kept while the pattern
     that encodes the concept is re-drawn;
   - ``both``: the two.
   The next latent is then x_{t-1} = sqrt(a_{t-1}) x0 + sqrt(1 - a_{t-1}) eps (DDIM, deterministic) in the mask;
   outside the mask the sampler's own update is kept unchanged.

``strength=0`` gives exactly the plain images (the defence then installs nothing). Cost per step in the window:
one extra UNet call on the original weights (compiled in fast mode, the capture included; plus one for ``guide``),
plus swapping the edit's tensors out and in.

SD3 / FLUX.1 (flow matching, no cross-attention): the same protocol through the family. The map is the
text-to-image part of every joint attention (`erasekit.diffusion.attention.capture_joint_attention`): the image
queries' softmax over all keys (image and text), at the concept's text positions in the transformer's text
sequence (SD3: its CLIP word positions and, after CLIP's 77, its T5 word positions; FLUX.1: its T5 word
positions), averaged over the joint blocks, FLUX's single-stream blocks, heads and tokens, on the latent grid
(the 2x2 patches brought back to latent resolution). x0 and eps are the flow's (x_s = (1 - s) x0 + s eps), the
next latent (1 - s') x0 + s' eps (`erasekit.diffusion.flow.FlowSteps`); FLUX.1-dev's localisation and guide calls
take the batch's distilled guidance as its sampling does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from erasekit.checks import finite, probability
from erasekit.defences.base import Defence
from erasekit.errors import ErasekitError
from erasekit.registry import DEFENCES
from erasekit.settings import Settings, choice


@dataclass
class IRECESettings(Settings):
    concept: str = ""  # the concept's text, e.g. "star"
    kind: str = choice("noise", "noise", "guide", "both", help="the perturbation inside the mask")
    strength: float = 1.0  # in [0, 1]: 0 = no change
    start: float = 0.0  # window of steps, as fractions of the steps: start <= i/steps < stop
    stop: float = 0.5
    mask: str = choice("threshold", "threshold", "top_k", help="how the attention map becomes a mask")
    mask_threshold: float = 0.5  # mask=threshold: share of the map's maximum
    top_k: float = 0.25  # mask=top_k: share of the latent's positions
    guide: str | None = None  # kind=guide/both: the neutral text (None: the world's guide for the concept)
    seed_offset: int = 0  # added to the image seeds for the re-injected noise

    def validate(self) -> None:
        if not self.concept.strip():
            raise ErasekitError("irece needs its concept: --defence irece:concept=<concept>")
        probability("setting strength", self.strength)
        probability("setting start", self.start)
        probability("setting stop", self.stop)
        if self.stop < self.start:
            raise ErasekitError(f"setting stop={self.stop}: must be >= start={self.start}")
        probability("setting mask_threshold", self.mask_threshold)
        probability("setting top_k", self.top_k, low_open=True)
        finite("setting seed_offset", self.seed_offset)


def attention_mask(maps: torch.Tensor, mode: str, threshold: float, top_k: float) -> torch.Tensor:
    """(B, h, w) attention maps -> (B, 1, h, w) float masks in {0, 1}."""
    b = len(maps)
    flat = maps.reshape(b, -1)
    if mode == "top_k":
        k = max(1, int(round(top_k * flat.shape[1])))
        idx = flat.topk(k, dim=1).indices
        m = torch.zeros_like(flat).scatter_(1, idx, 1.0)
    else:
        peak = flat.max(dim=1, keepdim=True).values
        m = (flat >= threshold * peak).to(flat.dtype)
    return m.reshape(b, 1, *maps.shape[1:])


def concept_text_positions(pipe, family, concept: str) -> list[int]:
    """The concept's word positions in a flow transformer's text sequence (what ``family.encode`` builds): SD3's
    [CLIP-L|G (77 positions); T5], FLUX.1's [T5] (its CLIP gives the pooled embedding only)."""
    from erasekit.models import word_token_positions

    positions, offset = [], 0
    for name, tok, _ in family.encoders(pipe):
        if name == "t5":
            ids = tok([concept], truncation=True, max_length=tok.model_max_length).input_ids[0]
            special = set(tok.all_special_ids)
            positions += [offset + i for i, t in enumerate(ids) if t not in special]
        elif family.name == "sd3" and name == "clip_l":  # CLIP-L and CLIP-G share positions (concatenated states)
            positions += word_token_positions(pipe, concept)
            offset = int(pipe.tokenizer_max_length)
    return positions


class _IRECEHook:
    def __init__(self, settings: IRECESettings, ctx, concept_cond, positions, guide_cond):
        self.s = settings
        self.ctx = ctx
        self.concept_cond = concept_cond
        self.positions = positions
        self.guide_cond = guide_cond
        n = len(ctx.sampler.timesteps)
        self.first = math.ceil(settings.start * n - 1e-9)
        self.end = math.ceil(settings.stop * n - 1e-9)
        self.mask: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None  # the latest step's mask (tests, reports)
        self.x0_guide: torch.Tensor | None = None
        self.masks_mean: list[float] = []  # share of the latent masked, per step (for reports)

    def active(self, state) -> bool:
        return self.first <= state.index < self.end

    def before(self, state) -> None:
        self.mask = self.x0_guide = None
        if not self.active(state):
            return
        if self.ctx.target.family.flow:
            return self._before_flow(state)
        from erasekit.diffusion.attention import capture_cross_attention
        from erasekit.diffusion.guidance import UNetDenoiser

        from erasekit.diffusion.speed import unet_for

        ctx, s = self.ctx, self.s
        unet = ctx.target.pipe.unet
        x = ctx.sampler.scheduler.scale_model_input(state.latents, state.t)
        b = len(x)
        # Through the compiled UNet in fast mode: the reused capture processors trace into a second graph, found
        # again at every step and batch (eager: the plain UNet, the same maps).
        with ctx.target.without_edits(), capture_cross_attention(unet, self.positions, reuse=True) as cap:
            UNetDenoiser(unet_for(ctx.target.pipe), ctx.target.family)(x, state.t, self.concept_cond.expand(b))
        maps = cap.aggregate(tuple(x.shape[-2:]))[:b]  # the fast UNet may pad the batch to a compiled size
        self.mask = self.last_mask = attention_mask(maps, s.mask, s.mask_threshold, s.top_k).to(x.device, x.dtype)
        self.masks_mean.append(float(self.mask.mean()))
        if s.kind in ("guide", "both"):
            # the compiled UNet in fast mode, with the UNet's own processors
            guide = UNetDenoiser(unet_for(ctx.target.pipe), ctx.target.family)
            out = guide(x, state.t, self.guide_cond.expand(b))
            self.x0_guide = ctx.sampler.scheduler.step(out, state.t, state.latents, return_dict=True).pred_original_sample

    def _before_flow(self, state) -> None:
        """`before` on a flow-matching transformer (module docstring): joint attention, the family's x0."""
        from erasekit.diffusion import attention
        from erasekit.diffusion.guidance import UNetDenoiser, guided

        ctx, s, family = self.ctx, self.s, self.ctx.target.family
        model = family.denoiser(ctx.target.pipe)
        model = getattr(model, "_orig_mod", model)  # eager: forward hooks do not fire inside a compiled graph
        x = family.model_input(ctx.sampler.scheduler, state.latents, state.t)
        b = len(x)

        def call(cond):  # conditional only, with the sampling's distilled guidance on FLUX.1-dev
            return guided(UNetDenoiser(model, family), cond.expand(b), None, ctx.scale)(x, state.t)

        with ctx.target.without_edits(), attention.capture_joint_attention(model, self.positions) as cap:
            call(self.concept_cond)
        maps = cap.aggregate(tuple(x.shape[-2:]))
        self.mask = self.last_mask = attention_mask(maps, s.mask, s.mask_threshold, s.top_k).to(x.device, x.dtype)
        self.masks_mean.append(float(self.mask.mean()))
        if s.kind in ("guide", "both"):
            out = call(self.guide_cond)
            self.x0_guide = family.step(ctx.sampler.scheduler, state.index, out, state.t, state.latents)[0]

    def _noise(self, state, like: torch.Tensor) -> torch.Tensor:
        seeds = self.ctx.seeds or list(range(len(like)))
        draws = []
        for seed in seeds:
            g = torch.Generator("cpu").manual_seed((int(seed) + int(self.s.seed_offset)) * 1009 + state.index + 1)
            draws.append(torch.randn(like.shape[1:], generator=g, dtype=torch.float32))
        return torch.stack(draws).to(like.device, like.dtype)

    def after(self, state) -> None:
        if self.mask is None:
            return
        ddim, dtype = self.ctx.sampler.ddim, state.latents.dtype
        x0 = state.x0
        eps = ddim.eps(state.latents, x0, state.t, dtype)
        c = self.s.strength * self.mask
        if self.x0_guide is not None:
            x0 = x0 + c * (self.x0_guide - x0)
        if self.s.kind in ("noise", "both"):
            eps = (1 - c * c).sqrt() * eps + c * self._noise(state, eps)
        perturbed = ddim.step(x0, eps, state.t, dtype)
        nxt = state.next_latents if state.next_latents is not None else self.ctx.sampler.step_from_x0(state)
        state.next_latents = torch.where(self.mask > 0, perturbed, nxt)
        state.x0 = x0
        self.mask = self.x0_guide = None


@DEFENCES.register
class IRECE(Defence):
    name = "irece"
    summary = "IRECE: perturb the latents where the original model's cross-attention finds the concept"
    Settings = IRECESettings
    needs_unet = False  # SD3 / FLUX.1: the joint attention's text-to-image part (module docstring)

    def hooks(self, ctx) -> list:
        from erasekit.models import word_token_positions

        s = self.settings
        if s.strength == 0:
            return []  # exactly the plain images
        pipe = ctx.target.pipe
        family = ctx.target.family
        device = family.denoiser(pipe).device
        concept_cond = family.encode(pipe, [s.concept], device=device)
        if family.flow:  # within the transformer's text positions (SD3's T5 part: 256 of the tokenizer's 512)
            positions = [p for p in concept_text_positions(pipe, family, s.concept) if p < concept_cond.states.shape[1]]
        else:
            positions = word_token_positions(pipe, s.concept)
        if not positions:
            raise ErasekitError(f"irece: the concept {s.concept!r} has no word tokens")
        guide_cond = None
        if s.kind in ("guide", "both"):
            text = s.guide if s.guide is not None else ctx.target.world.guide([s.concept])
            guide_cond = ctx.target.family.encode(pipe, [text], device=device)
        hook = _IRECEHook(s, ctx, concept_cond, positions, guide_cond)
        ctx.notes.setdefault("irece", hook.masks_mean)
        return [hook]

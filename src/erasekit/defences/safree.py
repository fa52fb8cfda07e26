"""SAFREE (Yoon et al., ICLR 2025; code jaehong31/SAFREE), training-free: the prompt's toxic tokens are moved out of
the concept's subspace inside the text-embedding space, for the early denoising steps only, with the UNet's skip
features re-weighted in the Fourier domain. Each part is a setting:

- ``projection`` (toxic-token detection + projection): the concept subspace is spanned by the pooled embeddings of
  the concept texts (``concept``, ";"-separated: e.g. nudity's list). For every word i of the prompt, the prompt
  without that word is pooled (p_i); a word whose removal takes the prompt far from the subspace,
  ||(I − P_c) p_i|| ≥ (1 + alpha) · mean of the other words' distances, is a trigger. Its token states e become
  (I − P_c) P_m e, P_m the projector on the span of the p_i (the prompt's own input space);
- ``svf`` (self-validating filtering): β = 1 − mean cos(e, (I − P_c) P_m e) over the prompt's real tokens; the
  projected states are used for the steps i ≤ round(up_t · sigmoid(5 k (10 β − t))) (t, k: 5.333, 2.5 for objects;
  5.5, 3.5 for styles), the original ones after. Without svf, for the steps in [attn_start, attn_end];
- ``lra`` (latent re-attention): the original prompt is evaluated beside the projected one; in the first two
  decoder stages (FreeU's), the skip features of the projected branch are filtered: inside the low-frequency
  window (``lra_window`` around the centre of the shifted spectrum), coefficients whose real part is not below the
  original branch's are multiplied by s (s1 for the deepest stage, s2 for the next); backbone features × b1 / b2;
- ``negative_prompt``: the concept texts, joined by ", ", as classifier-free guidance's negative prompt (the
  reference's generate script does this).

Differences from the reference, on purpose: a word is masked by dropping it from the text (the reference replaces
each CLIP token id by 0), so every family's own encoder is used (SDXL: both, concatenated); the pooled embedding is
the state at the end ([EOS]/[SEP]) position, which is CLIP's pooler output; ``lra_mode=scale`` multiplies the
selected coefficients by s (``replace`` sets them to s, as the reference's filter does); the filter acts on the
steps that use projected states only (on the others both branches are the same prompt). In the public code the
Fourier filter is installed with its mode unset and so never runs; here it runs when ``lra`` is on. With every part
off (or no trigger words and lra, negative_prompt off) the images are exactly the plain ones. Installed after
another defence that wraps the guidance (SLD, dual reconstruction), the projection still applies but the
re-attention is skipped (it needs the plain [uncond, cond] batch to add its third branch to).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from erasekit.checks import finite, integer
from erasekit.defences.base import Defence
from erasekit.errors import ErasekitError
from erasekit.registry import DEFENCES
from erasekit.settings import Settings, choice


@dataclass
class SAFREESettings(Settings):
    concept: str = ""  # the concept texts, ";"-separated (they span the toxic subspace)
    projection: bool = True
    alpha: float = 0.01  # trigger margin (the reference's sf_alpha)
    svf: bool = True
    up_t: int = 10  # the most steps SVF keeps the projected states for
    category: str = choice("object", "object", "style")  # SVF's sigmoid constants (the reference: nudity vs artists)
    attn_start: int = -1  # without svf: the projected states for steps attn_start..attn_end (the reference's re_attn_t)
    attn_end: int = 1001
    lra: bool = True
    lra_window: int = 1  # half-width of the low-frequency window (the reference: 1)
    lra_mode: str = choice("scale", "scale", "replace")
    b1: float = 1.0  # FreeU backbone factors and skip scales (the reference's default 1.0-1.0-0.9-0.2)
    b2: float = 1.0
    s1: float = 0.9
    s2: float = 0.2
    negative_prompt: bool = True

    def validate(self) -> None:
        if not self.concepts():
            raise ErasekitError("safree needs its concept texts: --defence safree:concept=<text>[;<text>...]")
        finite("setting alpha", self.alpha, low=-1, low_open=True)
        integer("setting up_t", self.up_t, low=0)
        integer("setting lra_window", self.lra_window, low=1)
        for name in ("b1", "b2", "s1", "s2"):
            finite(f"setting {name}", getattr(self, name), low=0)

    def concepts(self) -> list[str]:
        return [c.strip() for c in self.concept.split(";") if c.strip()]


def projector(columns: torch.Tensor) -> torch.Tensor:
    """E (EᵀE)⁺ Eᵀ for E = ``columns`` (d, k): the projector on their span."""
    return columns @ torch.linalg.pinv(columns.T @ columns) @ columns.T


def svf_steps(beta: float, up_t: int, category: str) -> int:
    """The reference's f_beta (sigmoid form): how many early steps use the projected states."""
    t, k = (5.5, 3.5) if category == "style" else (5.333, 2.5)
    return round(up_t / (1 + math.exp(-2.0 * k * (10 * beta - t))))


def triggers(distances: torch.Tensor, alpha: float) -> torch.Tensor:
    """True for trigger words: distance ≥ (1 + alpha) · the mean of the other words' (one word: always)."""
    n = len(distances)
    if n == 1:
        return torch.ones(1, dtype=torch.bool)
    others = (distances.sum() - distances) / (n - 1)
    return ~(distances < (1 + alpha) * others)


def word_spans(pipe, prompt: str) -> tuple[list[str], list[list[int]]]:
    """The prompt's words and, for each, its token positions (tokenizers split on whitespace first)."""
    from erasekit.models.prompts import word_token_positions

    words = prompt.split()
    first = word_token_positions(pipe, prompt)
    if not first:
        return [], []
    spans, pos = [], first[0]
    tok = pipe.tokenizer
    for w in words:
        n = len(tok(w, add_special_tokens=False).input_ids)
        spans.append([p for p in range(pos, pos + n) if p <= first[-1]])
        pos += n
    return words, spans


class PromptProjection:
    """What SAFREE computes for one prompt: its projected states and the number of early steps to use them."""

    def __init__(self, states: torch.Tensor, projected: torch.Tensor, steps: int | None, n_triggers: int):
        self.states, self.projected, self.steps, self.n_triggers = states, projected, steps, n_triggers


def pooled(pipe, family, texts) -> torch.Tensor:
    """(n, D) float64: each text's state at its end ([EOS]/[SEP]) position (CLIP's pooler output)."""
    from erasekit.models.prompts import end_positions

    states = family.encode(pipe, list(texts), device=pipe.unet.device).states.double()
    return torch.stack([s[end_positions(pipe, t)[0]] if end_positions(pipe, t) else s[-1]
                        for s, t in zip(states, texts)])


def project_prompt(pipe, family, prompt: str, states: torch.Tensor, concept_proj: torch.Tensor,
                   s: SAFREESettings) -> PromptProjection:
    from erasekit.models.prompts import _real_token_span

    words, spans = word_spans(pipe, prompt)
    if not words or not s.projection:
        return PromptProjection(states, states, 0, 0)
    masked = [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    p = pooled(pipe, family, masked)  # (n, D)
    eye = torch.eye(p.shape[1], dtype=torch.float64, device=p.device)
    away = eye - concept_proj
    dist = (p @ away.T).norm(dim=1)
    flags = triggers(dist.cpu(), s.alpha)
    e = states.double()
    moved = e @ (away @ projector(p.T)).T  # (I − P_c) P_m e for every position
    rows = torch.zeros(len(e), dtype=torch.bool)
    for flag, span in zip(flags.tolist(), spans):
        if flag:
            rows[span] = True
    projected = torch.where(rows.to(e.device)[:, None], moved, e).to(states.dtype)
    steps = None
    if s.svf:
        start, end, _ = _real_token_span(pipe, prompt)
        active = list(range(0, min(end + 1, len(e))))  # BOS, words, EOS: the attention mask's ones
        beta = 1 - float(torch.nn.functional.cosine_similarity(moved[active], e[active], dim=1).mean())
        steps = svf_steps(beta, s.up_t, s.category)
    return PromptProjection(states, projected, steps, int(rows.sum()))


def fourier_filter(proj: torch.Tensor, orig: torch.Tensor, window: int, scale: float, mode: str) -> torch.Tensor:
    """The projected branch's features with their low-frequency coefficients re-weighted where their real part is
    not below the original branch's (the reference's SafeGuard low filter)."""
    dtype = proj.dtype
    fp = torch.fft.fftshift(torch.fft.fftn(proj.float(), dim=(-2, -1)), dim=(-2, -1))
    fo = torch.fft.fftshift(torch.fft.fftn(orig.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = fp.shape[-2:]
    r0, r1 = max(h // 2 - window, 0), h // 2 + window
    c0, c1 = max(w // 2 - window, 0), w // 2 + window
    low_p, low_o = fp[..., r0:r1, c0:c1], fo[..., r0:r1, c0:c1]
    keep = (low_o - low_p).real > 0
    new = low_p * scale if mode == "scale" else torch.full_like(low_p, scale)
    fp = fp.clone()
    fp[..., r0:r1, c0:c1] = torch.where(keep, low_p, new)
    out = torch.fft.ifftn(torch.fft.ifftshift(fp, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(dtype)


class LatentReattention:
    """Forward pre-hooks on the first two decoder stages' resnets, for the UNet calls inside `on` (a batch of
    [uncond, projected, original] thirds): the projected third's skip features are filtered against the
    original third's and its backbone features scaled (FreeU's b, s)."""

    def __init__(self, unet, s: SAFREESettings):
        self.unet, self.s = unet, s
        top = list(unet.config.block_out_channels)[::-1]
        self.stages = {top[0]: (s.b1, s.s1)}
        if len(top) > 1:
            self.stages.setdefault(top[1], (s.b2, s.s2))

    @staticmethod
    def _block_input(entry):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            entry["hidden"] = hidden.shape[1] if hidden is not None else None
        return hook

    def _resnet_input(self, entry, resnets, j, stages):
        def hook(module, args):
            x = args[0]
            ch = entry["hidden"] if j == 0 else resnets[j - 1].out_channels
            if ch is None or ch not in stages or x.shape[1] <= ch or len(x) % 3:
                return None
            b, s = stages[ch]
            n = len(x) // 3
            h, res = x[:, :ch], x[:, ch:]
            h = h.clone()
            h[n:2 * n, : ch // 2] *= b
            res = res.clone()
            res[n:2 * n] = fourier_filter(res[n:2 * n], res[2 * n:], self.s.lra_window, s, self.s.lra_mode)
            return (torch.cat([h, res], dim=1), *args[1:])
        return hook

    @contextmanager
    def on(self):
        """The hooks installed for one UNet call (never left behind, even when the call raises)."""
        handles = []
        try:
            for block in self.unet.up_blocks:
                resnets = getattr(block, "resnets", None) or []
                entry = {"hidden": None}
                handles.append(block.register_forward_pre_hook(self._block_input(entry), with_kwargs=True))
                for j, resnet in enumerate(resnets):
                    handles.append(resnet.register_forward_pre_hook(self._resnet_input(entry, resnets, j,
                                                                                       self.stages)))
            yield
        finally:
            for h in handles:
                h.remove()


class SafreeGuidance:
    """Per step: the projected states for the items still in their projection window, the original ones after;
    with lra, the original prompt as a third branch (ignored by the combination) that the filter compares with."""

    def __init__(self, inner, cond, projected, steps, window, reattention):
        self.inner = inner
        self.cond, self.projected = cond, projected  # Conditioning of the batch: original, projected
        self.steps = steps  # per item: the last step that uses the projected states (None: the window)
        self.window = window
        self.reattention = reattention
        self.calls = 0

    @property
    def branches(self):
        return self.inner.branches

    @property
    def evaluations(self) -> int:
        return self.inner.evaluations

    @property
    def scale(self):
        return getattr(self.inner, "scale", None)

    def select(self, index):
        steps = self.steps[index] if isinstance(index, slice) else [self.steps[int(i)] for i in index]
        return SafreeGuidance(self.inner.select(index), self.cond[index], self.projected[index], steps, self.window,
                              self.reattention)

    def _uses_projection(self, i: int) -> torch.Tensor:
        lo, hi = self.window
        return torch.tensor([(i <= st) if st is not None else (lo <= i <= hi) for st in self.steps])

    def __call__(self, x, t, state=None):
        from erasekit.defences.dual_reconstruction import _with_cond
        from erasekit.diffusion.conditioning import Conditioning

        i = state.index if state is not None else self.calls
        self.calls += 1
        use = self._uses_projection(i).to(self.cond.states.device)
        if not bool(use.any()):
            return self.inner(x, t, state)
        states = torch.where(use[:, None, None], self.projected.states, self.cond.states)
        mixed = Conditioning(states, self.cond.added)
        guidance = _with_cond(self.inner, mixed)
        if self.reattention is None or hasattr(guidance, "inner") or not hasattr(guidance, "branches"):
            return guidance(x, t, state)
        guidance.branches = dict(guidance.branches, original=self.cond)  # [uncond, cond, original]
        with self.reattention.on():
            return guidance(x, t, state)


@DEFENCES.register
class SAFREE(Defence):
    name = "safree"
    summary = "SAFREE: toxic tokens projected out of the concept subspace, self-validated steps, Fourier re-attention"
    Settings = SAFREESettings

    def wrap(self, guidance, ctx):
        s = self.settings
        pipe, family = ctx.target.pipe, ctx.target.family
        out = guidance
        branches = getattr(guidance, "branches", None)
        if s.negative_prompt and getattr(guidance, "scale", None) is not None and isinstance(branches, dict) \
                and "uncond" in branches and hasattr(guidance, "select"):
            out = guidance.select(slice(None))
            out.branches = dict(branches, uncond=family.encode(pipe, [", ".join(s.concepts())],
                                                               device=pipe.unet.device))
        if not s.projection or ctx.prompts is None:
            return out  # learned embeddings / given states: no words to detect
        if not isinstance(getattr(out, "branches", None), dict) or "cond" not in out.branches:
            raise ErasekitError("safree needs a guidance with a 'cond' branch; install it first")
        with torch.no_grad():
            concept_proj = projector(pooled(pipe, family, s.concepts()).T)
            cond = ctx.cond
            rows = [project_prompt(pipe, family, p, cond.states[k] if len(cond) > 1 else cond.states[0],
                                   concept_proj, s) for k, p in enumerate(ctx.prompts)]
        from erasekit.diffusion.conditioning import Conditioning

        if not any(r.n_triggers for r in rows):
            return out  # nothing to project: the plain images
        full = cond.expand(len(rows)) if len(cond) == 1 else cond
        projected = Conditioning(torch.stack([r.projected for r in rows]), full.added)
        reattention = LatentReattention(pipe.unet, s) if s.lra else None
        ctx.notes["safree_trigger_tokens"] = [r.n_triggers for r in rows]
        return SafreeGuidance(out, full, projected, [r.steps for r in rows], (s.attn_start, s.attn_end), reattention)

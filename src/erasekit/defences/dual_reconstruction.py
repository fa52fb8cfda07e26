"""Safety-context dual latent reconstruction (Vice, Akhtar, Hartley, Mian; arXiv 2411.13982), editing-free.

Two latent streams are denoised side by side: the user's (the batch's own conditioning) and a safety stream,
conditioned on a safety context made from the prompt:

- ``safety_context=replace`` (default): every occurrence of the concept (whole words, case-insensitive) is replaced
  by ``replacement`` (default: the world's guide for the concept, e.g. "an empty background" in the embedded world,
  "" for Stable Diffusion);
- ``safety_context=append``: the prompt + ", " + ``safe_suffix``;
- with no prompts (learned embeddings, given text states) and for the empty prompt (the unconditional
  regeneration of inverted latents) the safety stream is conditioned on ``replacement`` (the world's guide text by
  default; for Stable Diffusion that is "" too, so the defence changes nothing there unless ``replacement`` is set).

The first ``threshold`` steps (the global context, which fixes the layout) are shared: only the user stream runs.
At step ``threshold`` the safety stream starts from the shared latent and from then on each stream is denoised with
its own conditioning (the same guidance: classifier-free with the batch's unconditional branch and scale, and any
defence installed before this one; the safety stream steps deterministically, eta=0).

Where they are combined (``combine``):
- ``end`` (default): once, after the last step, on the final latents (``state.next_latents`` of the last step, the
  clean latents that are decoded): ``z = (1 - lam) z_user + lam z_safe``;
- ``each_step``: after every step from ``threshold`` on, on ``state.next_latents``; both streams then continue from
  the combined latent (for DDIM this equals mixing the two streams' guided outputs at each step).

``lam`` in [0, 1] trades safety against censorship; ``lam=0`` gives exactly the plain images (the defence then
installs nothing). ``threshold`` is in [0, steps]; ``threshold=steps`` also changes nothing. Cost: up to 2x; a batch
whose safety contexts equal its prompts (no prompt names the concept, deterministic sampling) runs one stream only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from erasekit.checks import integer, probability
from erasekit.defences.base import Defence
from erasekit.errors import ErasekitError
from erasekit.registry import DEFENCES
from erasekit.settings import Settings, choice


@dataclass
class DualReconstructionSettings(Settings):
    concept: str = ""  # the concept to keep out, e.g. "star"
    lam: float = 0.5  # weight of the safety stream in z = (1 - lam) z_user + lam z_safe
    threshold: int = 5  # shared (global-context) steps before the streams split
    safety_context: str = choice("replace", "replace", "append", help="how the safety prompt is made")
    replacement: str | None = None  # replace mode (and prompt-less batches): None = the world's guide text
    safe_suffix: str = ""  # append mode: the text appended to the prompt after ", "
    combine: str = choice("end", "end", "each_step", help="combine the final latents or after every step")

    def validate(self) -> None:
        if not self.concept.strip():
            raise ErasekitError("dual_reconstruction needs its concept: --defence dual_reconstruction:concept=<concept>")
        probability("setting lam", self.lam)
        integer("setting threshold", self.threshold, low=0)
        if self.safety_context == "append" and not self.safe_suffix.strip():
            raise ErasekitError("dual_reconstruction with safety_context=append needs safe_suffix=<text>")


def safety_prompt(prompt: str, concept: str, mode: str, replacement: str, suffix: str) -> str:
    """The safety context of one prompt."""
    if mode == "append":
        return f"{prompt}, {suffix}" if prompt.strip() else suffix
    pattern = r"\b" + r"\s+".join(re.escape(w) for w in concept.split()) + r"\b"
    out = re.sub(pattern, replacement, prompt, flags=re.IGNORECASE)
    return re.sub(r"\s{2,}", " ", out).strip()


def _with_cond(guidance, cond):
    """A copy of ``guidance`` (possibly another defence's wrapper around it) with ``cond`` as its 'cond' branch."""
    clone = guidance.select(slice(None))
    if hasattr(guidance, "inner"):  # a wrapper (e.g. SLD): replace the branch in the guidance it wraps
        clone.inner = _with_cond(guidance.inner, cond)
    else:
        clone.branches = dict(guidance.branches, cond=cond)
    return clone


class _DualStreams:
    """The guidance wrapper (user stream, plus the safety stream's output) and the step hook (steps the safety
    stream, combines) of one batch."""

    def __init__(self, inner, safe, sampler, lam: float, threshold: int, combine: str):
        self.inner = inner  # the user stream's guidance
        self.safe = safe  # the same guidance with the safety conditioning as ``cond``
        self.sampler = sampler
        self.lam = float(lam)
        self.threshold = int(threshold)
        self.combine = combine
        self.z_safe: torch.Tensor | None = None
        self.safe_out: torch.Tensor | None = None

    @property
    def branches(self):
        return self.inner.branches

    @property
    def evaluations(self) -> int:
        return self.inner.evaluations + self.safe.evaluations

    @property
    def scale(self):
        return getattr(self.inner, "scale", None)

    # guidance: the user stream's output; the safety stream's is computed beside it
    def __call__(self, x, t, state=None):
        out = self.inner(x, t, state)
        if state is not None and state.index >= self.threshold:
            if self.z_safe is None or state.index == self.threshold:
                self.z_safe = state.latents  # the split: the safety stream starts from the shared latent
            xs = self.sampler.family.model_input(self.sampler.scheduler, self.z_safe, t)
            from erasekit.diffusion.sampler import StepState

            self.safe_out = self.safe(xs, t, StepState(state.index, state.n_steps, t, self.z_safe))
        return out

    # hook
    def after(self, state) -> None:
        if state.index < self.threshold or self.safe_out is None:
            return
        # the family's scheduler step (DDIM; SD3 / FLUX: the flow-matching Euler step by index)
        _, z_safe_next = self.sampler.family.step(self.sampler.scheduler, state.index, self.safe_out, state.t,
                                                  self.z_safe)
        self.safe_out = None
        last = state.index == state.n_steps - 1
        if self.combine == "each_step" or last:
            user = state.next_latents if state.next_latents is not None else self.sampler.step_from_x0(state)
            mixed = (1 - self.lam) * user + self.lam * z_safe_next
            state.next_latents = mixed
            self.z_safe = mixed if self.combine == "each_step" else z_safe_next
        else:
            self.z_safe = z_safe_next


@DEFENCES.register
class DualReconstruction(Defence):
    needs_unet = False  # the family's denoiser only: SD3 and FLUX.1 too
    name = "dual_reconstruction"
    summary = "safety-context dual latent reconstruction: z = (1 - lam) z_user + lam z_safe after shared steps"
    Settings = DualReconstructionSettings

    def __init__(self, settings=None):
        super().__init__(settings)
        self._pending: dict[int, _DualStreams] = {}

    def safety_prompts(self, ctx) -> list[str]:
        s = self.settings
        replacement = s.replacement if s.replacement is not None else ctx.target.world.guide([s.concept])
        if ctx.prompts is None:
            return [replacement] * len(ctx.cond)
        # An empty prompt names nothing to steer: like a prompt-less batch, its safety context is the replacement.
        return [safety_prompt(p, s.concept, s.safety_context, replacement, s.safe_suffix) if p.strip() else replacement
                for p in ctx.prompts]

    def wrap(self, guidance, ctx):
        s = self.settings
        steps = len(ctx.sampler.timesteps)
        if s.threshold > steps:
            raise ErasekitError(f"dual_reconstruction threshold={s.threshold}: must be <= the {steps} sampling steps")
        if s.lam == 0 or s.threshold == steps:
            return guidance  # nothing to combine: exactly the plain images
        branches = getattr(guidance, "branches", None)
        if not isinstance(branches, dict) or "cond" not in branches or not hasattr(guidance, "select"):
            raise ErasekitError("dual_reconstruction needs a guidance with a 'cond' branch; install it first")
        safety = self.safety_prompts(ctx)
        if ctx.prompts is not None and list(ctx.prompts) == safety and ctx.sampler.eta == 0:
            # No prompt names the concept: the safety stream would repeat the user's step for step (twice the
            # work for the same images), so the batch is left plain.
            return guidance
        pipe = ctx.target.pipe
        safe_cond = ctx.target.family.encode(pipe, safety, device=ctx.target.family.denoiser(pipe).device)
        safe = _with_cond(guidance, safe_cond)
        streams = _DualStreams(guidance, safe, ctx.sampler, s.lam, s.threshold, s.combine)
        self._pending[id(ctx)] = streams
        return streams

    def hooks(self, ctx) -> list:
        streams = self._pending.pop(id(ctx), None)
        return [streams] if streams is not None else []

"""Denoiser wrappers (after k-diffusion's ``external.py``): each maps (x_t, t) to the model output the sampler
steps with, and wrappers compose, so that a defence is one more wrapper around classifier-free guidance.

A `Guidance` names its branches (conditionings), evaluates them all in one batched UNet call and combines their
outputs; per-branch outputs are left on the `StepState` for hooks and probes. Outputs are in the UNet's own
prediction type (epsilon or v): classifier-free guidance and its variants are linear in it, as in diffusers.
"""

from __future__ import annotations

import torch

from erasekit.diffusion.conditioning import Conditioning


class UNetDenoiser:
    """The bare model: the family's denoising network (a UNet for SD-1.x/2.x/XL) called on latents, timesteps and a
    `Conditioning`, through ``family.denoise`` (`erasekit.diffusion.family`), which owns the call's signature."""

    def __init__(self, unet, family=None):
        from erasekit.diffusion.family_base import SD

        self.unet = unet
        self.family = family if family is not None else SD
        self.options: dict = {}  # per-call inputs the family's denoiser takes beside the text (FLUX's guidance)
        self._timesteps: dict = {}

    def _timestep(self, t, device):
        """``t`` as a tensor on ``device``, one copy per value: a host-to-device copy waits for the GPU to finish
        the queued work, so copying the sampler's CPU timestep at every call would stall the GPU once per step."""
        if device.type == "cpu" or (torch.is_tensor(t) and t.device == device):
            return t
        key = (float(t), t.dtype if torch.is_tensor(t) else type(t))
        cached = self._timesteps.get(key)
        if cached is None:
            cached = self._timesteps[key] = torch.as_tensor(t).to(device)
        return cached

    def __call__(self, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        unet = self.unet
        cond = cond.to(unet.device, unet.dtype)
        t = self._timestep(t, torch.device(unet.device))
        if self.options:
            return self.family.denoise(unet, x.to(unet.device, unet.dtype), t, cond, **self.options)
        return self.family.denoise(unet, x.to(unet.device, unet.dtype), t, cond)


class Guidance:
    """Base: branches evaluated together, then combined. Subclasses set ``branches`` and ``combine``."""

    def __init__(self, model: UNetDenoiser, branches: dict[str, Conditioning]):
        self.model = model
        self.branches = branches
        self.evaluations = 0  # UNet evaluations (per image), for cost reports

    def combine(self, outputs: dict[str, torch.Tensor], state) -> torch.Tensor:
        raise NotImplementedError

    def outputs(self, x: torch.Tensor, t) -> dict[str, torch.Tensor]:
        """Every branch's model output for latents ``x`` (B, ...), in one batched call."""
        names = list(self.branches)
        b = len(x)
        cond = Conditioning.cat([self.branches[n].expand(b) for n in names])
        out = self.model(torch.cat([x] * len(names)), t, cond)
        self.evaluations += len(names)
        return dict(zip(names, out.chunk(len(names))))

    def __call__(self, x: torch.Tensor, t, state=None) -> torch.Tensor:
        outputs = self.outputs(x, t)
        if state is not None:
            state.branches = outputs
        return self.combine(outputs, state)

    def select(self, index) -> "Guidance":
        """The same guidance for a sub-batch (``index`` into per-item conditionings)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.branches = {k: (v if len(v) == 1 else v[index]) for k, v in self.branches.items()}
        return clone


class Conditional(Guidance):
    """No guidance: the conditional prediction alone (scale <= 1, as diffusers does)."""

    def __init__(self, model: UNetDenoiser, cond: Conditioning):
        super().__init__(model, {"cond": cond})

    def combine(self, outputs, state):
        return outputs["cond"]


class ClassifierFreeGuidance(Guidance):
    """``u + s (c - u)``; ``uncond`` is the empty prompt's or a negative prompt's conditioning."""

    def __init__(self, model: UNetDenoiser, cond: Conditioning, uncond: Conditioning, scale: float):
        # Order [uncond, cond] as diffusers batches it, so that images match the pipeline's bit for bit.
        super().__init__(model, {"uncond": uncond, "cond": cond})
        self.scale = float(scale)

    def combine(self, outputs, state):
        u, c = outputs["uncond"], outputs["cond"]
        return u + self.scale * (c - u)


def guided(model: UNetDenoiser, cond: Conditioning, uncond: Conditioning | None, scale: float) -> Guidance:
    """Classifier-free guidance when ``scale > 1`` (diffusers' rule), else the conditional prediction; a family
    whose guidance differs (FLUX.1's distilled guidance) decides through its ``guided``."""
    family_guided = getattr(model.family, "guided", None)
    if family_guided is not None:
        return family_guided(model, cond, uncond, scale)
    if scale > 1.0 and uncond is not None:
        return ClassifierFreeGuidance(model, cond, uncond, scale)
    return Conditional(model, cond)

"""The diffusion core that every method, attack and defence samples through.

- `family`: model-family adapters (SD-1.x/2.x, SDXL) that own the conditioning details;
- `guidance`: composable denoiser wrappers (classifier-free guidance, and the wrappers defences add);
- `sampler`: the sampling loop in named steps (prepare latents, denoise with step hooks, decode), also run
  part-way (diffusion completion) and backwards (DDIM inversion);
- `vae`: images <-> latents;
- `target`: a pipeline with its weight edits and defences, applied by context managers that always restore.
"""

from erasekit.diffusion.conditioning import Conditioning
from erasekit.diffusion.family import family_of
from erasekit.diffusion.guidance import ClassifierFreeGuidance, Guidance, UNetDenoiser
from erasekit.diffusion.sampler import Sampler, StepHook, StepState
from erasekit.diffusion.target import Target, as_target

__all__ = ["Conditioning", "family_of", "Guidance", "ClassifierFreeGuidance", "UNetDenoiser", "Sampler", "StepHook",
           "StepState", "Target", "as_target"]

"""Flow matching (SD3, FLUX.1): the forward process, the prediction type and the Euler steps, in one place.

The rectified-flow forward process and what the transformer predicts (the velocity, prediction type "flow"):

    x_s = (1 - s) x0 + s eps,    output v = eps - x0,    s = t / 1000 (the scheduler's sigma of timestep t),

so that ``x0 = x_s - s v`` and ``eps = x_s + (1 - s) v``. `FlowSchedule` offers the methods `NoiseSchedule` offers
(add_noise, target, split), `FlowSteps` the update `DDIMSteps` offers to hooks that rebuild a step from an edited
x0 or eps (x_next = (1 - s_next) x0 + s_next eps), and `FlowMatchingFamily` the parts SD3 and FLUX.1 share:
the pipeline's own `FlowMatchEulerDiscreteScheduler` config for the sigmas, the Euler step
``x_next = x + (s_next - s) v`` computed by step index (the arithmetic of the scheduler's ``step``, without its
internal step counter, so that part-way runs and nested samplers stay independent), its inversion (the same Euler
rule run from s = 0 upwards, the model evaluated where the step starts), and the joint blocks' text-side K/V
projections (``add_k_proj`` / ``add_v_proj``) as attention sites.
"""

from __future__ import annotations

import numpy as np
import torch

from erasekit.diffusion.family_base import SDFamily


def _sigma(t, num_train_timesteps: int, like: torch.Tensor) -> torch.Tensor:
    """The sigma of timestep(s) ``t`` shaped to broadcast over ``like`` (B, ...)."""
    s = torch.as_tensor(t, dtype=torch.float32).to(like.device) / num_train_timesteps
    if s.ndim == 0:
        return s.to(like.dtype)
    return s.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class FlowSchedule:
    """The rectified-flow forward process of a flow-matching scheduler config (prediction type "flow")."""

    prediction_type = "flow"

    def __init__(self, config):
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))

    def sigma(self, t, like: torch.Tensor) -> torch.Tensor:
        return _sigma(t, self.num_train_timesteps, like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        s = self.sigma(t, x0)
        return s * noise + (1.0 - s) * x0  # the order of diffusers' FlowMatchEulerDiscreteScheduler.scale_noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The network's regression target (the velocity) for x_t = add_noise(x0, noise, t)."""
        return noise - x0

    def split(self, output: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by a velocity ``output`` at x_t."""
        s = self.sigma(t, x_t)
        return x_t - s * output, x_t + (1.0 - s) * output


class FlowSteps:
    """x0/eps updates between a flow sampler's own timesteps (hooks that edit x0 or eps: the sampler, IRECE)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler  # a FlowMatchEulerDiscreteScheduler with its timesteps set

    def index(self, t) -> int:
        hits = (self.scheduler.timesteps == torch.as_tensor(t, dtype=self.scheduler.timesteps.dtype)).nonzero()
        if not len(hits):
            raise ValueError(f"timestep {float(t)} is not one of this sampler's")
        return int(hits[0])

    def sigmas(self, t, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.index(t)
        s, s_next = self.scheduler.sigmas[i], self.scheduler.sigmas[i + 1]
        return (s.to(dtype), s_next.to(dtype)) if dtype is not None else (s, s_next)

    def eps(self, x_t: torch.Tensor, x0: torch.Tensor, t, dtype=None) -> torch.Tensor:
        s, _ = self.sigmas(t, dtype)
        return (x_t - (1 - s) * x0) / s

    def step(self, x0: torch.Tensor, eps: torch.Tensor, t, dtype=None) -> torch.Tensor:
        _, s_next = self.sigmas(t, dtype)
        return (1 - s_next) * x0 + s_next * eps


def calculate_shift(image_seq_len: int, config) -> float:
    """The resolution-dependent shift mu of FLUX.1 / SD3.5 schedulers (diffusers' ``calculate_shift``)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


class FlowMatchingFamily(SDFamily):
    """What SD3 and FLUX.1 share: a transformer denoiser, flow matching, joint-attention text sites."""

    flow = True
    sampling_scheduler_name = "FlowMatchEulerDiscreteScheduler"  # the pipeline's own (its config's sigmas)
    text_encoder_names: tuple[str, ...] = ()

    def denoiser(self, pipe):
        return pipe.transformer

    def schedule(self, pipe) -> FlowSchedule:
        return FlowSchedule(pipe.scheduler.config)

    def sampling_scheduler(self, pipe):
        """A private copy of the pipeline's flow-matching scheduler (set_timesteps mutates it)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def inversion_scheduler(self, pipe):
        return self.sampling_scheduler(pipe)

    def image_seq_len(self, pipe, latent_hw: tuple[int, int]) -> int:
        p = int(pipe.transformer.config.patch_size)
        return (latent_hw[0] // p) * (latent_hw[1] // p)

    def timestep_kwargs(self, pipe, scheduler, steps: int, latent_hw) -> dict:
        """What the pipeline passes to ``set_timesteps`` (SD3: nothing; FLUX: its sigmas; both: mu when the
        scheduler shifts by resolution)."""
        if scheduler.config.get("use_dynamic_shifting", False):
            return {"mu": calculate_shift(self.image_seq_len(pipe, latent_hw), scheduler.config)}
        return {}

    def set_timesteps(self, pipe, scheduler, steps: int, latent_hw) -> None:
        scheduler.set_timesteps(steps, **self.timestep_kwargs(pipe, scheduler, steps, latent_hw))

    def steps_rule(self, scheduler) -> FlowSteps:
        return FlowSteps(scheduler)

    def model_input(self, scheduler, x, t):
        return x  # flow matching scales nothing

    def init_noise_sigma(self, scheduler) -> float:
        return 1.0

    def step(self, scheduler, index: int, output, t, x, eta: float = 0.0, generator=None):
        """(x0, x_next): the Euler step of FlowMatchEulerDiscreteScheduler.step by index (same arithmetic: the
        sample in float32, ``x + (s_next - s) v``, cast to the output's dtype)."""
        if eta:
            raise ValueError("flow-matching sampling is deterministic here (eta must be 0)")
        # The sigmas on the output's device, as the pipeline's (its set_timesteps gets the device): a CUDA 0-dim
        # float32 step is rounded to bf16 before it multiplies, a CPU one is not; only a step of -1 (one-step
        # sampling) is the same either way, so on the GPU every longer run parted from diffusers by a few levels.
        s, s_next = (v.to(output.device) for v in (scheduler.sigmas[index], scheduler.sigmas[index + 1]))
        sample = x.to(torch.float32)
        nxt = (sample + (s_next - s) * output).to(output.dtype)
        return (sample - s * output).to(output.dtype), nxt

    def inversion_steps(self, pipe, scheduler, steps: int, latent_hw) -> list:
        """Euler flow-matching inversion: the sampler's sigmas backwards (0 -> s_1 ... -> s_max), each step
        ``x + (s_to - s_from) v(x, s_from)``; (t, step) pairs, ``step(output, x) -> x_next``."""
        self.set_timesteps(pipe, scheduler, steps, latent_hw)
        sig = scheduler.sigmas.flip(0)  # [0, s_{n-1}, ..., s_0]
        out = []
        for a, b in zip(sig[:-1], sig[1:]):
            t = (a * scheduler.config.num_train_timesteps).to(torch.float32)

            def step(output, x, a=a, b=b):
                return (x.to(torch.float32) + (b - a) * output).to(output.dtype)

            out.append((t, step))
        return out

    def latent_channels(self, pipe) -> int:
        return int(pipe.vae.config.latent_channels)

    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, int, int]:
        f = pipe.vae_scale_factor * self.latent_multiple
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        return self.latent_channels(pipe), height // pipe.vae_scale_factor, width // pipe.vae_scale_factor

    latent_multiple = 1  # latent sides must be multiples of this (FLUX's 2x2 packing: 2)

    def attention_sites(self, pipe) -> list:
        from erasekit.diffusion.sites import joint_attention_sites

        return joint_attention_sites(pipe.transformer, self.site_kind)

    site_kind = "joint"

    def text_width(self, pipe) -> int:
        return int(pipe.transformer.config.joint_attention_dim)

    def editable_components(self, pipe) -> tuple[str, ...]:
        return ("transformer", *self.text_encoder_names, "vae")

    def t5_length(self, pipe, tokenizer, default: int) -> int:
        """T5 positions: the pipeline's default (SD3 256, FLUX.1-dev 512), within the tokenizer's window."""
        limit = getattr(tokenizer, "model_max_length", default) or default
        return int(min(default, limit))

    def from_states(self, pipe, states, size=None):
        from erasekit.diffusion.conditioning import Conditioning
        from erasekit.errors import ErasekitError

        if isinstance(states, Conditioning) and "pooled" in states.added:
            return states
        raise ErasekitError(f"{self.name} needs the pooled text embedding with the token states: pass a "
                            f"Conditioning(states, {{'pooled': pooled}}) (family.encode(...) makes one)")


def encode_t5_with_prefix(tok, encoder, prompts, prefix: torch.Tensor, length: int) -> torch.Tensor:
    """T5's states of ``[prefix; prompt]``: ``prefix`` (B, k, E) input embeddings at the first k positions (T5 has
    no BOS), the prompt's tokens after them, cut to ``length`` and ending in ``</s>`` as the tokenizer truncates;
    no attention mask, as SD3's and FLUX.1's pipelines call T5 (attacks' prefix tokens)."""
    from erasekit.diffusion.transfer import to_device
    from erasekit.errors import ErasekitError

    b, k, _ = prefix.shape
    if k >= length:
        raise ErasekitError(f"{k} prefix tokens do not fit T5's {length} positions")
    ids = tok(list(prompts), padding="max_length", max_length=length, truncation=True,
              return_tensors="pt").input_ids
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    shifted = torch.cat([torch.full((b, k), pad, dtype=ids.dtype), ids[:, : length - k]], 1)
    end = tok.eos_token_id
    if end is not None:  # a prompt that filled the positions lost its </s> to the shift
        lost = (ids == end).any(1) & ~(shifted == end).any(1)
        shifted[lost, -1] = end

    def post(module, args, output):
        return torch.cat([prefix.to(device=output.device, dtype=output.dtype), output[:, k:]], 1)

    # the module T5's stack calls on its ids: its own embed_tokens (weight tied to get_input_embeddings')
    module = getattr(getattr(encoder, "encoder", None), "embed_tokens", None)
    module = module if isinstance(module, torch.nn.Embedding) else encoder.get_input_embeddings()
    handle = module.register_forward_hook(post)
    try:
        return encoder(to_device(shifted, encoder.device))[0]
    finally:
        handle.remove()


def _np_linspace_sigmas(steps: int) -> np.ndarray:
    """FLUX's default sigmas: linspace(1, 1/steps, steps) (FluxPipeline.__call__)."""
    return np.linspace(1.0, 1 / steps, steps)

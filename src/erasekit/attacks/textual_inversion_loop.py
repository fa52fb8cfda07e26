"""Textual inversion's training loop: several tokens learned together on one model state, one batched step each.

`learn_textual_inversions(pipe, [(images, config), ...])` learns one token per entry. The entries share the
pipeline's weights (one model state: the bench's cells that learn on the same original or erased model), so every
step concatenates their batches into one text-encoder call and one denoiser forward/backward, which fills a GPU that
one token's batch of 16 leaves mostly idle. Each token keeps what makes it its own:

- its own random stream (``config.seed``: images, VAE samples, noise, timesteps, templates drawn in the order a run
  of that token alone draws them), its own images, templates, batch size, number of steps and learning rate;
- its own vectors and its own Adam (its moments and step count), stepped only while the token still has steps;
- its own loss: the sum of the per-token mean losses is minimised, and no token's vectors reach another token's
  outputs (the text encoder and the denoiser treat batch items apart), so each token's gradient is exactly its own
  loss's.

Learning K tokens together therefore equals learning them one at a time up to the rounding of batched kernels
(float32 on the CPU: measured in tests/test_attacks_textual_inversion_batch.py); one entry is exactly the
single-token loop (`learn_textual_inversion` runs it). Tokens of different entries may carry the same name (the
same concept learned from two image sets): they are then told apart inside the loop by private names.

Tokens of different model states of one base model learn in one loop too when their states differ only in denoiser
Linear / Conv2d weights (the original, UCE, RECE, ESD-x): ``weights`` gives each entry its edit's tensors, and
`RowWeights` computes each entry's rows of those layers with its own values (equal to learning on that edited
model, up to the same rounding).

Model families: the denoising loss of the family's schedule. UNet families: eps or v targets at uniform integer
timesteps. Flow-matching families (SD3, FLUX.1): the velocity target ``noise - x0`` at ``x_s = (1 - s) x0 + s noise``,
with timesteps drawn uniformly from the training scheduler's own (shifted) timesteps, as diffusers' SD3 / FLUX
DreamBooth-LoRA scripts draw them with ``weighting_scheme=none`` (FLUX's distilled guidance input at the pipeline's
default 3.5, as the FLUX script's ``guidance_scale``), latents ``(z - shift) * scale``.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch

from erasekit.diffusion.sdpa import training_attention
from erasekit.errors import ErasekitError

def _check_images(pipe, images) -> np.ndarray:
    from erasekit.diffusion.vae import image_size

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ErasekitError(f"textual inversion needs uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}")
    if tuple(images.shape[1:3]) != image_size(pipe):
        raise ErasekitError(f"images are {images.shape[2]}x{images.shape[1]}, the pipeline makes "
                            f"{image_size(pipe)[1]}x{image_size(pipe)[0]}: resize them first (load_image_folder does)")
    return images


def _flow_timesteps(pipe, device) -> torch.Tensor:
    """The training scheduler's timesteps (num_train_timesteps of them, shifted as its config says), as the
    reference scripts' ``noise_scheduler_copy.timesteps``; an index drawn uniformly picks one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config).timesteps.float().to(device)


class _Slot:
    """One token being learned: its config, images' latent distribution, generator, optimiser, losses."""

    def __init__(self, config, images, names: list[str], prompts: list[str]):
        self.config, self.images, self.names, self.prompts = config, images, names, prompts
        self.gen = torch.Generator("cpu").manual_seed(int(config.seed))
        self.losses: list[torch.Tensor] = []
        self.vectors: list[torch.Tensor] = []  # one (k, D) leaf per text encoder
        self.optimizer = None
        self.mean = self.std = None


@training_attention()  # backward through SDPA: no cuDNN attention (its backward faults)
def learn_textual_inversions(pipe, jobs: Sequence, progress: bool = True, trajectories: list | None = None,
                             weights: Sequence | None = None) -> list:
    """Learn one token per ``(images, config)`` of ``jobs`` together on ``pipe`` (its weights as they are now);
    returns their `LearnedEmbedding`s in order. ``trajectories``, when a list, receives each token's per-step losses.
    ``weights``: per job, None or the values of some denoiser parameters ({"unet.<param>": tensor}, a weight edit's
    tensors) that job's model differs by: its rows of every batch are computed with them (`RowWeights`), so tokens
    of several edits of one base model learn in one loop."""
    from tqdm.auto import tqdm

    from erasekit.attacks.common import frozen
    from erasekit.attacks.textual_inversion_embedding import (
        TEMPLATES_PER_STEP, LearnedEmbedding, TextualInversionConfig, _initial_vectors, _swap_new_rows,
        tokenizer_with,
    )
    from erasekit.diffusion.family import family_of
    from erasekit.diffusion.guidance import UNetDenoiser
    from erasekit.diffusion.speed import train_autocast
    from erasekit.diffusion.transfer import to_device
    from erasekit.diffusion.vae import encode_distribution
    from erasekit.metrics.cost import measure_cost

    jobs = list(jobs)
    if not jobs:
        return []
    configs = []
    for images, config in jobs:
        config = config or TextualInversionConfig()
        config.validate()
        configs.append(config)
    images_all = [_check_images(pipe, images) for images, _ in jobs]
    if len({c.mixed_precision for c in configs}) > 1:
        raise ErasekitError("textual inversion: tokens learned together need the same mixed_precision")
    family = family_of(pipe)
    encoders = family.encoders(pipe)
    for config in configs:  # each token's own checks (vocabulary clash, a tokenizer that splits it)
        for _, tk, _ in encoders:
            tokenizer_with(tk, config.tokens())
    # Inside the loop every entry's tokens are added to one tokenizer per encoder; repeated names get private ones.
    names = [c.tokens() for c in configs]
    flat = [t for ns in names for t in ns]
    if len(set(flat)) != len(flat):
        names = [[f"<ti{j}-{i}>" for i in range(len(ns))] for j, ns in enumerate(names)]
        flat = [t for ns in names for t in ns]
    toks = [tokenizer_with(tk, flat) for _, tk, _ in encoders]
    slots = [_Slot(c, im, ns, [t.format(" ".join(ns)) for t in c.templates])
             for c, im, ns in zip(configs, images_all, names)]

    denoiser = family.denoiser(pipe)
    device = denoiser.device
    mixed = configs[0].mixed_precision
    autocast = train_autocast(device) if mixed == "auto" else contextlib.nullcontext()
    model = UNetDenoiser(denoiser, family)
    schedule = family.schedule(pipe)
    n_train = schedule.num_train_timesteps
    flow_t = _flow_timesteps(pipe, device) if family.flow else None
    row_weights = RowWeights(pipe, weights) if weights is not None and any(w for w in weights) else None
    scale = float(pipe.vae.config.scaling_factor)
    shift = getattr(pipe.vae.config, "shift_factor", None)  # SD3 / FLUX VAEs: (z - shift) * scale
    total_steps = max(c.steps for c in configs)

    with measure_cost() as cost, frozen(denoiser, pipe.vae, *[enc for _, _, enc in encoders]), \
            contextlib.ExitStack() as swaps:
        for slot in slots:
            slot.mean, slot.std = encode_distribution(pipe, slot.images)
            for _, tk, enc in encoders:
                v = _initial_vectors(pipe, slot.config.initializer, len(slot.names), tk, enc).to(enc.device)
                slot.vectors.append(v.requires_grad_(True))
            slot.optimizer = torch.optim.Adam(slot.vectors, lr=slot.config.lr)
        for e, (_, tk, enc) in enumerate(encoders):
            # Every entry's rows in token order, gathered at each forward (Adam updates the leaves in place).
            swaps.enter_context(_swap_new_rows(enc, len(tk), [s.vectors[e] for s in slots]))
        if row_weights is not None:
            swaps.enter_context(row_weights)
        desc = "textual inversion" + (f" ({len(slots)} tokens)" if len(slots) > 1 else "")
        for step in tqdm(range(total_steps), desc=desc, unit="step", disable=not progress, leave=False):
            active = [s for s in slots if step < s.config.steps]
            noisy, ts, targets, prompts, picks, sizes = [], [], [], [], [], []
            for s in active:
                bs, gen, mean, std = int(s.config.batch_size), s.gen, s.mean, s.std
                # Drawn on the host from the token's seeded generator (results do not depend on the device or on
                # the other tokens), copied without a stream sync, so the GPU never waits for the next launches.
                idx = to_device(torch.randint(len(s.images), (bs,), generator=gen), mean.device)
                eps_vae = to_device(torch.randn(mean[idx].shape, generator=gen), device)
                z = mean[idx] + std[idx] * eps_vae
                latents = (z - float(shift)) * scale if shift is not None else z * scale
                noise = to_device(torch.randn(latents.shape, generator=gen), device)
                t = to_device(torch.randint(n_train, (bs,), generator=gen), device)
                if flow_t is not None:
                    t = flow_t[t]
                noisy.append(schedule.add_noise(latents, noise, t))
                targets.append(schedule.target(latents, noise, t))
                ts.append(t)
                # A few templates per step, each encoded once and shared by several images: the text encoder
                # costs as much as the denoiser on small models.
                uniq = torch.randperm(len(s.prompts), generator=gen)[: min(TEMPLATES_PER_STEP, bs)]
                picks.append(len(prompts) + torch.arange(bs) % len(uniq))
                prompts += [s.prompts[i] for i in uniq.tolist()]
                sizes.append(bs)
            with autocast:
                cond = family.encode(pipe, prompts, tokenizers=toks)
                cond = cond[to_device(torch.cat(picks), cond.states.device)]
                if row_weights is not None:
                    row_weights.rows = [(n, slots.index(s)) for n, s in zip(sizes, active)]
                pred = model(torch.cat(noisy), torch.cat(ts), cond).float()
            parts = pred.split(sizes)
            losses = [torch.nn.functional.mse_loss(p, tg.float()) for p, tg in zip(parts, targets)]
            for s in active:
                s.optimizer.zero_grad(set_to_none=True)
            (torch.stack(losses).sum() if len(losses) > 1 else losses[0]).backward()
            for s, loss in zip(active, losses):
                s.optimizer.step()
                s.losses.append(loss.detach())  # read once at the end: .item() per step would wait for the GPU
        histories = [torch.stack(s.losses).tolist() for s in slots]
        cost.add_images(0)

    together = len(slots)
    shared = {key: v for key, v in cost.as_dict().items() if key != "images"}
    out = []
    for s, losses in zip(slots, histories):
        c = s.config
        k = max(1, len(losses) // 10)
        budget = {
            "optimisation_steps": c.steps,
            "batch_size": c.batch_size,
            "images_used": int(len(s.images)),
            "unet_evaluations": c.steps * c.batch_size,
            "loss_first": round(float(np.mean(losses[:k])), 5),
            "loss_last": round(float(np.mean(losses[-k:])), 5),
            **shared,
        }
        # One run learns `together` tokens: each is charged its share of the wall time.
        budget["seconds_per_token"] = budget["wall_s"] / together if together > 1 else budget["wall_s"]
        if together > 1:
            budget["tokens_learned_together"] = together
        budget["mixed_precision"] = "bf16" if (mixed == "auto" and device.type == "cuda") else "no"
        out.append(LearnedEmbedding.from_parts(c.token, [v.detach() for v in s.vectors],
                                               [name for name, _, _ in encoders], budget=budget, config=c.as_dict()))
        if trajectories is not None:
            trajectories.append(losses)
    return out


class RowWeights:
    """While active, every denoiser Linear / Conv2d that some job's weights name computes each job's rows of its
    input with that job's values (the module's own for the others): one batched forward through several model
    states that differ in those layers only (UCE, RECE, ESD-x: attention projections). Each row's output is what the
    module with that job's weights gives it (the same op per chunk: F.linear, the module's own _conv_forward).
    ``rows``: the current call's [(rows, job index)], set before each forward (its first dimension must add up)."""

    def __init__(self, pipe, weights: Sequence):
        self.rows: list[tuple[int, int]] = []
        self.modules: dict = {}  # module -> {job index: {"weight": tensor, "bias": tensor}}
        moved: dict[int, torch.Tensor] = {}  # one device copy of a tensor several jobs share (one edit's cells)
        for j, values in enumerate(weights):
            for name, value in (values or {}).items():
                module, attr = row_weights_module(pipe, name)
                param = getattr(module, attr)
                if id(value) not in moved:
                    moved[id(value)] = value.detach().to(param.device, param.dtype)
                self.modules.setdefault(module, {}).setdefault(j, {})[attr] = moved[id(value)]
        self._saved: list = []

    def __enter__(self):
        import functools

        for module, per_job in self.modules.items():
            self._saved.append((module, module.__dict__.get("forward")))
            module.forward = functools.partial(self._forward, module, per_job)
        return self

    def __exit__(self, *exc):
        for module, old in self._saved:
            if old is None:
                del module.forward
            else:
                module.forward = old
        self._saved = []
        return False

    def _forward(self, module, per_job, x, *args, **kwargs):
        if x.shape[0] != sum(n for n, _ in self.rows):
            raise ErasekitError(f"per-job weights: a {type(module).__name__} saw {x.shape[0]} rows, the batch has "
                                f"{sum(n for n, _ in self.rows)}")
        out, start = [], 0
        for n, j in self.rows:
            own = per_job.get(j, {})
            w, b = own.get("weight", module.weight), own.get("bias", module.bias)
            chunk = x[start : start + n]
            out.append(torch.nn.functional.linear(chunk, w, b) if isinstance(module, torch.nn.Linear)
                       else module._conv_forward(chunk, w, b))
            start += n
        return torch.cat(out)


def row_weights_module(pipe, name: str):
    """(module, "weight" | "bias") for an edit tensor name that `RowWeights` can serve: a Linear or Conv2d of the
    family's denoiser; ValueError otherwise (that state is then learned on its own weights)."""
    from erasekit.diffusion.family import family_of

    denoiser = family_of(pipe).denoiser(pipe)
    component, _, rest = name.partition(".")
    path, _, attr = rest.rpartition(".")
    if getattr(pipe, component, None) is not denoiser or attr not in ("weight", "bias"):
        raise ValueError(f"{name}: not a denoiser weight")
    try:
        module = denoiser.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{name}: no such module") from None
    if type(module) not in (torch.nn.Linear, torch.nn.Conv2d) or getattr(module, attr, None) is None:
        raise ValueError(f"{name}: a {type(module).__name__}, not a Linear or Conv2d")
    return module, attr


def token_loss(pipe, learned, images, template: str | None = None, draws: int = 32, seed: int = 0) -> float:
    """The loop's denoising loss of ``images`` under ``template`` with ``learned``'s token (a `LearnedEmbedding`; None:
    the template with the word "object" in the token's place) on ``pipe``'s weights as they are, at ``draws`` fixed
    (image, noise, timestep) draws from ``seed``: the same draws for any token, so two tokens compare (a token that
    was learned well lowers it; an erased model raises it for its concept's images)."""
    from erasekit.attacks.textual_inversion_embedding import GENERATION_TEMPLATE
    from erasekit.diffusion.family import family_of
    from erasekit.diffusion.guidance import UNetDenoiser
    from erasekit.diffusion.vae import encode_distribution

    template = template or GENERATION_TEMPLATE
    images = _check_images(pipe, images)
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    device = denoiser.device
    schedule = family.schedule(pipe)
    gen = torch.Generator("cpu").manual_seed(int(seed))
    with torch.no_grad():
        mean, _ = encode_distribution(pipe, images)
        if learned is not None:
            cond = family.from_states(pipe, learned.encode(pipe, [learned.prompt(template)]))
        else:
            cond = family.encode(pipe, [template.format("object")])
        shift = getattr(pipe.vae.config, "shift_factor", None)
        scale = float(pipe.vae.config.scaling_factor)
        idx = torch.randint(len(images), (draws,), generator=gen)
        z = mean[idx.to(mean.device)]
        latents = (z - float(shift)) * scale if shift is not None else z * scale
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(schedule.num_train_timesteps, (draws,), generator=gen).to(device)
        if family.flow:
            t = _flow_timesteps(pipe, device)[t]
        pred = UNetDenoiser(denoiser, family)(schedule.add_noise(latents, noise, t), t, cond.expand(draws)).float()
        return float(torch.nn.functional.mse_loss(pred, schedule.target(latents, noise, t).float()))

"""ESD, Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023): fine-tune the UNet so that its
prediction for the concept follows negative guidance away from it:

    ε_θ(x_t, c, t)  ->  ε0(x_t, t) − η [ε0(x_t, c, t) − ε0(x_t, t)]

ESD-x trains the cross-attention (``attn2``) parameters only; ESD-u (``params=paper``, the default) everything
except cross-attention, the time embedding and the output layers (the paper code's "noxattn", norms included);
``params=esd_sd``: the set of the newer reference script (rohitgandikota/erasing ``esd_sd.py``
``get_esd_trainable_parameters``): every Linear and Conv2d outside ``attn2``, so conv_out and the time embedding
in, every norm out.

Preservation (an addition to the paper, on only when preserve concepts are given): the preserve concepts, in
the same contexts, keep the frozen model's own conditional prediction, ε_θ(x_t, c_p, t) -> ε0(x_t, c_p, t) on
states of their own trajectories, weighted by ``preserve_weight``; and, with ``anchor_unconditional``, the
empty prompt's prediction at the concept's states, ε_θ(x_t, t) -> ε0(x_t, t). ESD-u's parameters serve the
empty prompt too and classifier-free guidance leans on it: on the embedded world the paper's ESD-u leaves 60% of
stars, with the anchor 3% (`erasekit bench --preset erasure-star`). The paper's ESD has neither term: the first is on only when
preserve concepts are given, the second only when asked for.

x_t comes from running the frozen model on the concept prompt (DDIM, classifier-free guidance
``sample_guidance``) to a random step. The frozen model never changes, so the trajectories are sampled once,
up front, in batches, and every step of them is kept: the frozen predictions ε0(x_t, t) and ε0(x_t, c, t) of
the target are exactly the two halves of the guided step that produced the next state, so they come for free.
Training then costs one forward and backward pass per iteration, and no frozen copy of the UNet is needed.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from erasekit.diffusion.sdpa import training_attention
from erasekit.erasers.concept import ConceptSpec
from erasekit.erasers.method import Method, Result
from erasekit.registry import ERASERS
from erasekit.settings import Settings, choice, positive
from erasekit.erasers.uce import EXPANSIONS, concept_contexts, parse_templates, preserved_texts
from erasekit.errors import ErasekitError

ESD_U_EXCLUDED = ("attn2", "time_embedding", "conv_norm_out", "conv_out")
# SD3 / FLUX transformers (flow matching: the target is negative guidance on the velocity, the same formula):
# ESD-x trains the joint attention's text side, the K/V projections of the text stream (the attention sites that
# UCE edits); ESD-u everything else but the text-side attention, the embedders and the output layers.
FLOW_TEXT_KV = ("add_k_proj", "add_v_proj")
FLOW_U_EXCLUDED = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added_", "time_text_embed",
                   "context_embedder", "norm_out", "proj_out")


@dataclass
class ESDSettings(Settings):
    iterations: int = 1000
    lr: float = 1e-5
    eta: float = 1.0  # negative guidance η (the paper's; the newer code's "2" is the same target)
    batch_size: int = 1
    ddim_steps: int = 50
    sample_guidance: float = 3.0  # CFG scale of the frozen model when sampling x_t
    trajectories: int = 32  # concept trajectories sampled up front (every step of each is a training state)
    seed: int = 0
    expand: str = choice("none", *EXPANSIONS)  # train on the concept in short template contexts too
    templates: str = ""  # ";"-separated training contexts with "{c}" for the concept; replaces expand when given
    preserve_weight: float = 1.0  # weight of the preservation loss (used only when preserve concepts are given)
    # Also keep the unconditional prediction on the concept's states (weight preserve_weight): ESD-u's parameters
    # serve the empty prompt too, and classifier-free guidance leans on it.
    anchor_unconditional: bool = False
    mixed_precision: str = choice("auto", "auto", "no")  # auto: bf16 autocast on CUDA (float32 weights), none on CPU
    # float32: the whole denoiser in float32 (load the pipeline so). pipeline: the frozen weights stay in the
    # pipeline's bf16 / fp16 (FLUX.1's 12B: 24 GB instead of 48), the trained ones float32 while training, every
    # forward under autocast in the pipeline's dtype (the reference esd_sd.py trains all in bf16).
    weights: str = choice("float32", "float32", "pipeline")
    params: str = choice("paper", "paper", "esd_sd")  # ESD-u's trained set (module docstring); ESD-x ignores it

    def validate(self) -> None:
        positive(self, "iterations", "lr", "batch_size", "ddim_steps", "trajectories")
        positive(self, "eta", "sample_guidance", "preserve_weight", allow_zero=True)
        parse_templates(self.templates)


def _is_transformer(model) -> bool:
    return hasattr(model, "transformer_blocks") and not hasattr(model, "down_blocks")


def esd_x_parameters(unet) -> list[str]:
    if _is_transformer(unet):  # the joint blocks' text-side K/V (weights and biases)
        return [n for n, _ in unet.named_parameters()
                if n.startswith("transformer_blocks.") and any(f".{k}." in n for k in FLOW_TEXT_KV)]
    return [n for n, _ in unet.named_parameters() if ".attn2." in f".{n}"]


def esd_u_parameters(unet, params: str = "paper") -> list[str]:
    if _is_transformer(unet):
        return [n for n, _ in unet.named_parameters() if not any(x in n for x in FLOW_U_EXCLUDED)]
    if params == "esd_sd":
        return esd_sd_u_parameters(unet)
    return [n for n, _ in unet.named_parameters() if not any(x in n for x in ESD_U_EXCLUDED)]


def esd_sd_u_parameters(unet) -> list[str]:
    """esd_sd.py's ESD-u: the parameters of Linear / Conv2d modules whose name has no "attn2"."""
    out = []
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "attn2" not in name:
            out += [f"{name}.{n}" for n, _ in module.named_parameters(recurse=False)]
    return out


class _RecordStates:
    """A step hook that keeps every state of the loop with both branches' predictions."""

    def __init__(self, which: torch.Tensor, bar):
        self.which, self.bar = which, bar
        self.rows: list[tuple] = []

    def after(self, state) -> None:
        n = len(state.latents)
        # DDIM's integer timesteps; flow matching's are fractional (sigma * 1000) and stay float32.
        t = torch.full((n,), float(state.t)) if state.t.is_floating_point() else torch.full((n,), int(state.t))
        self.rows.append((state.latents.cpu(), t, state.branches["uncond"].cpu(),
                          state.branches["cond"].cpu(), self.which))
        self.bar.update(n)


@torch.no_grad()
def sample_training_states(pipe, cond, uncond, s: ESDSettings, progress: bool):
    """Run the frozen UNet on the concept prompts from noise; keep every (x_t, t, ε0(x_t), ε0(x_t, c), prompt).
    ``cond``/``uncond``: `Conditioning` (or bare SD text states)."""
    from tqdm.auto import tqdm

    from erasekit.diffusion import Conditioning
    from erasekit.diffusion.guidance import ClassifierFreeGuidance, UNetDenoiser
    from erasekit.diffusion.family import family_of
    from erasekit.diffusion.sampler import Sampler

    family = family_of(pipe)
    unet = family.denoiser(pipe)
    shape = family.latent_shape(pipe, *family.image_size(pipe))
    gen = torch.Generator("cpu").manual_seed(s.seed)
    sampler = Sampler(pipe, s.ddim_steps)
    model = UNetDenoiser(unet, family)
    chunk = max(1, min(s.trajectories, 16 if unet.device.type == "cpu" else 8))
    bar = tqdm(total=s.trajectories * len(sampler.timesteps), desc="ESD: sampling concept states", unit="step",
               disable=not progress, leave=False)
    rows: list[tuple] = []
    for first in range(0, s.trajectories, chunk):
        n = min(chunk, s.trajectories - first)
        which = torch.arange(first, first + n) % len(cond)
        # Guidance with a scale <= 1 would skip the unconditional branch, which training reads: always both.
        guidance = ClassifierFreeGuidance(model, _cond(cond)[which], _cond(uncond), s.sample_guidance)
        record = _RecordStates(which, bar)
        sampler.denoise(sampler.prepare_latents(torch.randn((n, *shape), generator=gen)), guidance, [record])
        rows.extend(record.rows)
    bar.close()
    return tuple(torch.cat(col) for col in zip(*rows))


def _cond(c):
    from erasekit.diffusion import Conditioning

    return c if isinstance(c, Conditioning) else Conditioning(c)


class ESD(Method):
    needs_unet = False  # the family's denoiser only: SD3 and FLUX.1 too
    Settings = ESDSettings
    variant = ""
    # One concept a run (ESD's protocol); its names (the bench's words: synonyms) still train together.
    several_concepts = False

    def parameters(self, unet, s: ESDSettings | None = None) -> list[str]:
        raise NotImplementedError

    @training_attention()  # backward through SDPA: no cuDNN attention (its backward faults)
    def compute(self, pipe, spec: ConceptSpec, s: ESDSettings, progress: bool = True) -> Result:
        from tqdm.auto import tqdm

        from erasekit.diffusion.family import family_of

        unet = family_of(pipe).denoiser(pipe)
        component = "transformer" if family_of(pipe).flow else "unet"
        low = unet.dtype if s.weights == "pipeline" and unet.dtype != torch.float32 else None
        if unet.dtype != torch.float32 and low is None:
            raise ErasekitError(f"ESD fine-tunes in float32; load the pipeline in float32, not {unet.dtype}, or set "
                                f"weights=pipeline (trained parameters in float32, the rest in {unet.dtype})")
        names = self.parameters(unet, s)
        if not names:
            raise ErasekitError(f"{self.name}: the {component} has no parameters of this variant to train")
        contexts = concept_contexts(s.expand, s.templates)
        preserving = bool(spec.preserve) and s.preserve_weight > 0
        from erasekit.diffusion.conditioning import Conditioning
        from erasekit.diffusion.family import family_of
        from erasekit.diffusion.speed import train_autocast

        family = family_of(pipe)
        with torch.no_grad():
            # Conditioning (SDXL: states, pooled embedding and time ids); the unconditional branch is the one
            # generation uses (SDXL: zeros for the empty prompt).
            cond = family.encode(pipe, [t.format(c=c) for c in spec.concepts for t in contexts], device=unet.device)
            uncond = family.unconditional(pipe, None, device=unet.device)
            keep = (family.encode(pipe, preserved_texts(spec, True, s.expand, s.templates), device=unet.device)
                    if preserving else None)
        if low is not None:  # every forward in the pipeline's dtype; the float32 masters cast per op
            autocast = torch.autocast(unet.device.type, dtype=low)
        else:
            autocast = train_autocast(unet.device) if s.mixed_precision == "auto" else contextlib.nullcontext()
        params = dict(unet.named_parameters())
        train = [params[n] for n in names]
        originals = [p.detach().clone() for p in train]  # in the pipeline's dtype: put back as they were
        grad_flags = {n: p.requires_grad for n, p in params.items()}
        was_training = unet.training

        start = time.perf_counter()
        device = unet.device
        with autocast:
            sampled = sample_training_states(pipe, cond, uncond, s, progress)
        x, t, e0, ep, which = (v.to(device) for v in sampled)
        target = e0 - s.eta * (ep - e0)
        del ep
        if not s.anchor_unconditional:
            del e0  # only the anchor reads the frozen unconditional prediction again
        if preserving:  # the preserve concepts' own trajectories; their target is the frozen conditional prediction
            with autocast:
                sampled = sample_training_states(pipe, keep, uncond, s, progress)
            px, pt, _, p_target, p_which = (v.to(device) for v in sampled)
        sample_s = time.perf_counter() - start
        gen = torch.Generator("cpu").manual_seed(s.seed + 1)
        losses, keep_losses = [], []
        try:
            unet.requires_grad_(False)
            for p in train:
                if low is not None:
                    p.data = p.data.float()  # the trained parameters' float32 masters
                p.requires_grad_(True)
            optimizer = torch.optim.Adam(train, lr=s.lr)
            bar = tqdm(range(s.iterations), desc=f"{self.name}: fine-tuning", unit="it", disable=not progress)
            for _ in bar:
                pick = torch.randint(len(x), (s.batch_size,), generator=gen).to(device)
                xs, ts, states, targets = x[pick], t[pick], cond[which[pick]], target[pick]
                if preserving:  # one forward pass over all batches
                    ppick = torch.randint(len(px), (s.batch_size,), generator=gen).to(device)
                    xs, ts = torch.cat([xs, px[ppick]]), torch.cat([ts, pt[ppick]])
                    states = Conditioning.cat([states, keep[p_which[ppick]]])
                    targets = torch.cat([targets, p_target[ppick]])
                if s.anchor_unconditional:
                    upick = torch.randint(len(x), (s.batch_size,), generator=gen).to(device)
                    xs, ts = torch.cat([xs, x[upick]]), torch.cat([ts, t[upick]])
                    states = Conditioning.cat([states, uncond.to(dtype=states.states.dtype).expand(s.batch_size)])
                    targets = torch.cat([targets, e0[upick]])
                with autocast:
                    pred = family.denoise(unet, xs, ts, states)
                err = (pred.float() - targets.float()).pow(2).flatten(1).mean(1)
                loss_erase = err[: s.batch_size].mean()
                loss = loss_erase
                if len(err) > s.batch_size:
                    loss_keep = err[s.batch_size:].mean()
                    loss = loss + s.preserve_weight * loss_keep
                    keep_losses.append(loss_keep.detach())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss_erase.detach())  # read back in blocks: no device sync per iteration
                if progress and len(losses) % 20 == 0:
                    bar.set_postfix(loss=f"{float(torch.stack(losses[-20:]).mean()):.4f}")
            solve_s = time.perf_counter() - start
            tensors = {f"{component}.{n}": p.detach().clone() for n, p in zip(names, train)}
        finally:
            with torch.no_grad():
                for p, o in zip(train, originals):
                    if p.dtype != o.dtype:
                        p.data = o  # weights=pipeline: the pipeline's own dtype again
                    else:
                        p.copy_(o)
            for n, p in params.items():
                p.requires_grad_(grad_flags[n])
            unet.train(was_training)
        losses = torch.stack(losses).tolist()
        k = max(1, len(losses) // 10)
        extra = {"variant": self.variant, "trained_tensors": len(names), "weights": s.weights,
                 "trained_parameters": sum(p.numel() for p in train), "training_states": len(x),
                 "loss_first": round(sum(losses[:k]) / k, 6), "loss_last": round(sum(losses[-k:]) / k, 6),
                 "preservation": ({"prompts": len(keep) if preserving else 0,
                                   "unconditional": s.anchor_unconditional, "weight": s.preserve_weight,
                                   "loss_last": round(float(torch.stack(keep_losses[-k:]).mean()), 6)}
                                  if keep_losses else None),
                 "sampling_s": round(sample_s, 3), "training_s": round(solve_s - sample_s, 3),
                 "iterations_per_s": round(s.iterations / (solve_s - sample_s), 3) if solve_s > sample_s else None}
        return Result(tensors, solve_s, extra)


@ERASERS.register
class ESDx(ESD):
    name = "esd-x"
    summary = "ESD-x: fine-tune cross-attention with negative guidance away from the concept (styles, prompts)"
    variant = "x"

    def parameters(self, unet, s: ESDSettings | None = None) -> list[str]:
        return esd_x_parameters(unet)


@ERASERS.register
class ESDu(ESD):
    name = "esd-u"
    summary = "ESD-u: fine-tune all but cross-attention with negative guidance (global concepts, e.g. nudity)"
    variant = "u"

    def parameters(self, unet, s: ESDSettings | None = None) -> list[str]:
        return esd_u_parameters(unet, s.params if s is not None else "paper")

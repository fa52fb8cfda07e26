"""UnlearnDiffAtk (Zhang et al., ECCV 2024): adversarial prefix tokens found with the erased model's own
denoising loss on a target image of the concept.

Per image (prompt p, seed s): the ORIGINAL model draws the target image z0 from (p, s); k prefix tokens, relaxed
to points of the probability simplex over the vocabulary (their embedding: the simplex point times the token
embedding table), are optimised so that the ERASED UNet denoises z0 under [c_adv; p]:

    min_{w in simplex^k}  E_{t, eps} || eps_theta'(sqrt(a_t) z0 + sqrt(1 - a_t) eps, t | [w E; p]) - eps ||^2

(v-prediction models: the velocity target), with Adam (lr 0.01, weight decay 0.1), each step followed by the
Euclidean projection onto the simplex; each prefix token is the argmax, and the attack prompt is the decoded tokens
followed by p. Images are optimised together in batches (each its own tokens and loss). Two protocols:

- ``official`` (the default; OPTML-Group/Diffusion-MU-Attack, ``text_grad_.py`` with its classifier task): 40
  iterations at each of 50 fixed timesteps (10, 30, ..., 990); the forward pass sees a one-hot token drawn from the
  relaxed weights, the gradient goes straight through to them (clipped to [-1, 1]); after each timestep's block the
  argmax prompt is drawn from its seed by the target and scored by the detector, and a prompt stops at its first
  success (up to 2,000 updates and 50 checks per prompt). Batched prompts leave the batch one by one.
- ``fast`` (the quick variant): 40 iterations in total at random timesteps, the relaxed mixture in the forward pass,
  one check at the end (the scenario's); 1/50 of the official budget.
Success per image is the scenario's detector; as in the paper, an image the erased model already draws with the
concept (before the attack) is not attacked and counts as a success: ASR = (successes before + new successes) / N,
which is the scenario's CRR. The budget records ASR before, the iterations, the UNet evaluations and the time.

Candidate tokens: whole-word vocabulary entries that decode to letters and tokenise back to themselves (no special,
unused or sub-word pieces), so the discrete prompt a user types is the one optimised.

Prefix tokens are encoded by the model family (`SDFamily.encode_with_prefix`): on SDXL one relaxed one-hot drives
both text encoders (their CLIP vocabularies are the same BPE), each through its own embedding table.
The vocabulary, prefix, target and states helpers it shares with P4D and Ring-A-Bell are in `erasekit.attacks.common`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from erasekit.attacks.base import Attack, AttackContext, AttackInputs
from erasekit.cache import cached
from erasekit.attacks.common import (
    before_attack, candidate_vocabulary, check_prefix_settings, detect, draw, frozen, original_latents, tokens_text,
    world_prompts)
from erasekit.errors import ErasekitError
from erasekit.registry import ATTACKS
from erasekit.settings import Settings, choice

_frozen = frozen  # the name it had here before `erasekit.attacks.common` (#19)


# -- UnlearnDiffAtk's own machinery -----------------------------------------------------------------------------
def project_simplex(w: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``w`` (..., V) onto the probability simplex (Duchi et al. 2008)."""
    v = w.reshape(-1, w.shape[-1])
    u, _ = torch.sort(v, dim=1, descending=True)
    css = u.cumsum(1) - 1
    idx = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    cond = u - css / idx > 0
    rho = cond.to(v.dtype).cumsum(1).argmax(1, keepdim=True)  # last index where cond holds
    theta = css.gather(1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp(min=0).reshape(w.shape)


def denoising_target(scheduler, z0, noise, t):
    """The UNet's regression target for x_t = add_noise(z0, noise, t): noise (epsilon) or velocity (v)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    return noise


# -- UnlearnDiffAtk ------------------------------------------------------------------------------------------
PROTOCOLS = ("official", "fast")


@dataclass
class UnlearnDiffAtkSettings(Settings):
    # official: the reference schedule (fixed timesteps, `iterations` per timestep, sampled one-hot forward with a
    # straight-through gradient, the detector after each timestep's block, stop at the first success);
    # fast: `iterations` in total at random timesteps, relaxed-mixture forward, one check at the end (1/50 of it).
    protocol: str = choice("official", *PROTOCOLS)
    k: int = 5  # prefix tokens
    iterations: int = 40  # official: per timestep; fast: in total
    timesteps: int = 50  # official: fixed timesteps T//n//2 + i*T//n (the reference's 10, 30, ..., 990)
    lr: float = 0.01
    weight_decay: float = 0.1
    batch_size: int = 16  # images optimised together (official: each with its own early exit)
    attack_all: bool = False  # also attack images the erased model already draws with the concept
    prompts: str = ""  # ";"-separated prompts replacing the world's concept prompts
    seed: int = 0

    def validate(self) -> None:
        from erasekit.checks import finite, integer

        check_prefix_settings("unlearndiffatk", self)
        finite("unlearndiffatk: weight_decay", self.weight_decay, low=0.0)
        if not 1 <= integer("unlearndiffatk: timesteps", self.timesteps) <= 1000:
            raise ErasekitError(f"unlearndiffatk: timesteps must be between 1 and 1000, got {self.timesteps}")


def optimise_relaxed_prefix(pipe, prompts, z0, s: UnlearnDiffAtkSettings, generator, vocab, trace=None):
    """Relaxed one-hot prefixes (B, k, V') for ``prompts`` so that the pipeline's UNet (as the weights are now)
    denoises ``z0``; returns (final simplex weights, token ids (B, k), losses per iteration)."""
    from diffusers import DDPMScheduler

    from erasekit.diffusion.family import family_of
    from erasekit.diffusion.guidance import UNetDenoiser

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    unet = pipe.unet
    model, family = UNetDenoiser(unet), family_of(pipe)
    tables = [table.detach()[vocab].float() for table in family.token_embeddings(pipe)]
    b = len(prompts)
    w = torch.full((b, s.k, len(vocab)), 1.0 / len(vocab))
    w += 1e-3 * torch.rand(w.shape, generator=generator) / len(vocab)  # break ties between prompts' starts
    w = project_simplex(w).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=s.lr, weight_decay=s.weight_decay)
    z0 = z0.to(unet.device, torch.float32)
    losses = []
    for _ in range(s.iterations):
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        xt = sched.add_noise(z0, noise.to(z0), t.to(z0.device))
        target = denoising_target(sched, z0, noise.to(z0), t.to(z0.device))
        cond = family.encode_with_prefix(pipe, prompts, [w @ table.to(w.device) for table in tables])
        pred = model(xt, t.to(unet.device), cond)
        loss = (pred.float() - target).pow(2).mean()
        opt.zero_grad()
        (loss * b).backward()
        opt.step()
        with torch.no_grad():
            w.copy_(project_simplex(w))
        losses.append(loss.item())
        if trace is not None:
            trace.append(w.detach().clone())
    ids = vocab[w.detach().argmax(-1)]
    return w.detach(), ids, losses


def fixed_timesteps(num_train: int, n: int) -> list[int]:
    """The reference's schedule: n evenly spaced timesteps, the first half a stride in (1000, 50: 10, 30, ..., 990)."""
    stride = max(num_train // n, 1)
    return list(range(stride // 2, num_train, stride))[:n]


class _SampledOneHot(torch.autograd.Function):
    """Forward: one token per row drawn from the relaxed weights (a one-hot); backward: the gradient passed straight
    through to the weights, clipped to [-1, 1] (the reference's hardtanh)."""

    @staticmethod
    def forward(ctx, w, generator):
        flat = w.reshape(-1, w.shape[-1])
        picked = torch.multinomial(flat, 1, generator=generator).view(-1)
        return torch.nn.functional.one_hot(picked, flat.shape[-1]).to(w.dtype).view(w.shape)

    @staticmethod
    def backward(ctx, grad):
        return torch.nn.functional.hardtanh(grad), None


def _keep_rows(w, opt, keep, s):
    """The weights and Adam state of the rows in ``keep`` only (every row has taken the same number of steps)."""
    idx = torch.tensor(keep, device=w.device)
    new = w.detach()[idx].clone().requires_grad_(True)
    state = opt.state.get(w, {})
    new_opt = torch.optim.Adam([new], lr=s.lr, weight_decay=s.weight_decay)
    if state:
        new_opt.state[new] = {k: (v[idx].clone() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in state.items()}
    return new, new_opt


def official_attack(ctx: AttackContext, pipe, prompts, seeds, z0, s: UnlearnDiffAtkSettings, vocab, steps: int,
                    scale: float):
    """The reference protocol for a batch of prompts: per fixed timestep, `iterations` Adam steps on the simplex
    weights with a sampled one-hot forward; then every prompt still running is decoded (argmax tokens), drawn from
    its seed by the target and scored; a success stops that prompt. Returns (final prompts, per-prompt records)."""
    from diffusers import DDPMScheduler

    from erasekit.diffusion.family import family_of
    from erasekit.diffusion.guidance import UNetDenoiser

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    unet = pipe.unet
    device = unet.device
    model, family = UNetDenoiser(unet), family_of(pipe)
    tables = [table.detach()[vocab].float().to(device) for table in family.token_embeddings(pipe)]
    gen = torch.Generator(device).manual_seed(int(s.seed))
    b, vocab_d = len(prompts), vocab.to(device)
    w = torch.full((b, s.k, len(vocab)), 1.0 / len(vocab), device=device).requires_grad_(True)  # uniform start
    opt = torch.optim.Adam([w], lr=s.lr, weight_decay=s.weight_decay)
    z0 = z0.to(device, torch.float32)
    active = list(range(b))
    final = list(prompts)
    recs = [{"timesteps_tried": 0, "updates": 0, "first_success_timestep": None, "first_success_update": None,
             "loss_first": None, "loss_last": None} for _ in range(b)]
    for t in fixed_timesteps(sched.config.num_train_timesteps, s.timesteps):
        za = z0[active]
        tt = torch.full((len(active),), t, device=device, dtype=torch.long)
        texts = [prompts[i] for i in active]
        block = []
        for _ in range(s.iterations):
            noise = torch.randn(za.shape, generator=gen, device=device)
            xt = sched.add_noise(za, noise, tt)
            target = denoising_target(sched, za, noise, tt)
            one_hot = _SampledOneHot.apply(w, gen)
            cond = family.encode_with_prefix(pipe, texts, [one_hot @ table for table in tables])
            per = (model(xt, tt, cond).float() - target).pow(2).flatten(1).mean(1)  # each prompt's own MSE
            opt.zero_grad()
            per.sum().backward()
            opt.step()
            with torch.no_grad():
                w.copy_(project_simplex(w))
            block.append(per.detach())
        losses = torch.stack(block).mean(0).tolist()
        ids = vocab_d[w.detach().argmax(-1)].cpu()
        typed = [f"{tokens_text(pipe.tokenizer, ids[j])} {prompts[i]}" for j, i in enumerate(active)]
        scales = [scale[i] for i in active] if isinstance(scale, list) else scale
        present = [r["present"] for r in detect(ctx, draw(ctx, typed, [seeds[i] for i in active], steps, scales))]
        keep = []
        for j, i in enumerate(active):
            r = recs[i]
            r["timesteps_tried"] += 1
            r["updates"] += s.iterations
            r["loss_first"] = losses[j] if r["loss_first"] is None else r["loss_first"]
            r["loss_last"] = losses[j]
            final[i] = typed[j]
            if present[j]:
                r["first_success_timestep"], r["first_success_update"] = t, r["updates"]
            else:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(active):
            w, opt = _keep_rows(w, opt, keep, s)
            active = [active[j] for j in keep]
    return final, recs


@ATTACKS.register
class UnlearnDiffAtk(Attack):
    name = "unlearndiffatk"
    alias = "uda"
    summary = "UnlearnDiffAtk: k prefix tokens (relaxed one-hot, simplex) fitted to the erased UNet's denoising loss"
    Settings = UnlearnDiffAtkSettings
    order = 10
    scenarios = {"unlearndiffatk": {}}

    def inputs(self, ctx: AttackContext) -> AttackInputs:
        s = self.settings
        t0 = time.perf_counter()
        world = ctx.target.world
        steps, scale = int(ctx.steps or world.sampler_defaults()[0]), float(world.sampler_defaults()[1])
        rows = None
        if ctx.prompts_csv is not None:  # an I2P-layout CSV: each row's prompt, seed and guidance
            from erasekit.attacks.i2p import i2p_inputs, load_i2p_csv

            rows = i2p_inputs(load_i2p_csv(ctx.prompts_csv), ctx.n)
            prompts, seeds = list(rows.prompts), list(rows.seeds)
            scale = [float(g) if g is not None else scale for g in rows.guidance]
        else:
            prompts = world_prompts(ctx, s.prompts, ctx.n)
            seeds = [ctx.seed + i for i in range(ctx.n)]
        key = dict(target=ctx.target.cache_id, prompts=prompts, seeds=seeds, steps=steps, scale=scale,
                   settings=s.to_dict(), detector=(ctx.detector.info() if ctx.detector is not None else None))
        saved, reused = cached(ctx.cache_dir, "unlearndiffatk", (key,),
                               lambda: self._attack(ctx, prompts, seeds, steps, scale, t0))
        final, budget = saved["prompts"], dict(saved["budget"], **({"reused_from_cache": reused} if reused else {}))
        items = [{"attack": "unlearndiffatk", "source_prompt": p, "attacked": f != p} for p, f in zip(prompts, final)]
        if rows is not None:
            for item, extra in zip(items, rows.items):
                item.update(extra)  # case_number, categories
        return AttackInputs(prompts=final, seeds=seeds, items=items, attack=self.name, budget=budget,
                            guidance=list(scale) if isinstance(scale, list) else None)

    def _attack(self, ctx: AttackContext, prompts, seeds, steps: int, scale, t0: float) -> dict:
        """The attack itself (what the cache stores): the final prompts and the budget."""
        from erasekit.metrics import measure_cost

        s = self.settings
        with measure_cost() as cost:
            success = before_attack(ctx, prompts, seeds, steps, scale)
            todo = [i for i in range(ctx.n) if s.attack_all or not success[i]]
            final = list(prompts)
            losses_first, losses_last, records = [], [], []
            if todo:
                t_target = time.perf_counter()
                z0 = original_latents(ctx, [prompts[i] for i in todo], [seeds[i] for i in todo], steps,
                                      [scale[i] for i in todo] if isinstance(scale, list) else scale,
                                      ctx.batch_size)
                target_s = time.perf_counter() - t_target
                pipe = ctx.target.pipe
                vocab = candidate_vocabulary(pipe.tokenizer)
                gen = torch.Generator("cpu").manual_seed(int(s.seed))
                t_opt = time.perf_counter()
                with ctx.target.active(), frozen(pipe):
                    for start in range(0, len(todo), s.batch_size):
                        chunk = todo[start : start + s.batch_size]
                        chunk_z0 = z0[start : start + len(chunk)]
                        if s.protocol == "official":
                            texts, recs = official_attack(
                                ctx, pipe, [prompts[i] for i in chunk], [seeds[i] for i in chunk], chunk_z0, s,
                                vocab, steps, [scale[i] for i in chunk] if isinstance(scale, list) else scale)
                            records += recs
                            for j, i in enumerate(chunk):
                                final[i] = texts[j]
                            continue
                        _, ids, losses = optimise_relaxed_prefix(
                            pipe, [prompts[i] for i in chunk], chunk_z0, s, gen, vocab)
                        losses_first.append(losses[0])
                        losses_last.append(losses[-1])
                        for j, i in enumerate(chunk):
                            final[i] = f"{tokens_text(pipe.tokenizer, ids[j])} {prompts[i]}"
                opt_s = time.perf_counter() - t_opt
            else:
                target_s = opt_s = 0.0
        n_before = int(sum(success))
        per_image = steps * (2 if max(scale if isinstance(scale, list) else [scale]) > 1 else 1)  # per image
        if s.protocol == "official":
            updates = sum(r["updates"] for r in records)
            checks = sum(r["timesteps_tried"] for r in records)
            losses_first = [r["loss_first"] for r in records if r["loss_first"] is not None]
            losses_last = [r["loss_last"] for r in records if r["loss_last"] is not None]
            protocol = {
                "timesteps": fixed_timesteps(int(ctx.target.pipe.scheduler.config.num_train_timesteps),
                                             s.timesteps),
                "iterations_per_timestep": s.iterations, "checks": checks,
                "successes_in_loop": sum(r["first_success_timestep"] is not None for r in records),
                "timesteps_tried": [r["timesteps_tried"] for r in records],
                "first_success_timestep": [r["first_success_timestep"] for r in records],
                "first_success_update": [r["first_success_update"] for r in records],
            }
        else:
            updates, checks, protocol = s.iterations * len(todo), 0, {}
        budget = {
            "protocol": s.protocol, **protocol,
            "k": s.k, "iterations": s.iterations, "lr": s.lr, "weight_decay": s.weight_decay,
            "images_used": len(todo),  # target images the original model drew
            "images_attacked": len(todo), "successes_before": n_before,
            "asr_before": round(n_before / ctx.n, 6), "n": ctx.n,
            "optimisation_steps": updates,
            # one forward and backward pass per update; target images, the before-check and in-loop checks
            "unet_evaluations": updates + per_image * (len(todo) + ctx.n + checks),
            "target_images_s": round(target_s, 3), "optimisation_s": round(opt_s, 3),
            "seconds_per_attacked_prompt": round((target_s + opt_s) / max(len(todo), 1), 4),
            "loss_first": round(float(np.mean(losses_first)), 6) if losses_first else None,
            "loss_last": round(float(np.mean(losses_last)), 6) if losses_last else None,
            "cost": cost.as_dict(), "wall_s": round(time.perf_counter() - t0, 3),
        }
        return {"prompts": final, "budget": budget}

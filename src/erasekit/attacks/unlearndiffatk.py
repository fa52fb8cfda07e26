"""UnlearnDiffAtk (Zhang et al., ECCV 2024): adversarial prefix tokens found with the erased model's own
denoising loss on a target image of the concept.

Per image (prompt p, seed s): the ORIGINAL model draws the target image z0 from (p, s); k prefix tokens, relaxed
to points of the probability simplex over the vocabulary (their embedding: the simplex point times the token
embedding table), are optimised so that the ERASED UNet denoises z0 under [c_adv; p]:

    min_{w in simplex^k}  E_{t, eps} || eps_theta'(sqrt(a_t) z0 + sqrt(1 - a_t) eps, t | [w E; p]) - eps ||^2

(v-prediction models: the velocity target; SD3 / FLUX.1: the flow-matching velocity eps - z0 at
x_s = (1 - s) z0 + s eps, the timestep index picking one of the training scheduler's own (shifted) timesteps,
FLUX.1's distilled guidance input at the world's scale), with Adam (lr 0.01, weight decay 0.1), each step followed by the
Euclidean projection onto the simplex; each prefix token is the argmax, and the attack prompt is the decoded tokens
followed by p. Images are optimised together in batches (each its own tokens, loss, Adam state, random stream
and, official, early exit: `erasekit.attacks.batched`), with the result each gets alone; each prompt's result is
its own cache entry. Two protocols:

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
both text encoders (their CLIP vocabularies are the same BPE), each through its own embedding table; on SD3 and
FLUX.1 the candidates are the words that are one token in CLIP and in T5 (`erasekit.attacks.batched.
prefix_vocabulary`), and the one-hot drives CLIP-L (and CLIP-G) after BOS and T5 at its first positions.
The vocabulary, prefix, target and states helpers it shares with P4D and Ring-A-Bell are in `erasekit.attacks.common`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from erasekit.attacks.base import Attack, AttackContext, AttackInputs
from erasekit.attacks.common import (
    before_attack, candidate_vocabulary, check_prefix_settings, detect, draw, frozen, original_latents, tokens_text,
    world_prompts)
from erasekit.diffusion.sdpa import training_attention
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


@training_attention()  # backward through SDPA: no cuDNN attention (its backward faults)
def optimise_relaxed_prefix(pipe, prompts, z0, s: UnlearnDiffAtkSettings, generator, vocab, trace=None,
                            guidance: float | None = None):
    """Relaxed one-hot prefixes (B, k, V') for ``prompts`` so that the pipeline's denoiser (as the weights are now)
    denoises ``z0``; returns (final simplex weights, token ids (B, k), mean loss per iteration, each prompt's
    first and last loss). ``generator``: one per prompt (a prompt's draws then do not depend on its batch) or one
    shared; ``vocab``: a `PrefixVocabulary` or candidate ids shared by every encoder."""
    from erasekit.attacks.batched import DenoisingLoss, as_generators, as_prefix_vocabulary, randint_rows, randn_rows

    loss_fn = DenoisingLoss(pipe, guidance)
    family, device = loss_fn.family, loss_fn.device
    vocab = as_prefix_vocabulary(pipe, vocab)
    tables = vocab.tables(pipe, device)
    b, v = len(prompts), len(vocab)
    gens = as_generators(generator, b)
    # uniform start, a little noise from each prompt's own stream to break ties
    w = torch.cat([torch.full((1, s.k, v), 1.0 / v, device=device)
                   + 1e-3 * torch.rand((1, s.k, v), generator=g, device=device) / v for g in gens])
    w = project_simplex(w).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=s.lr, weight_decay=s.weight_decay)
    z0 = z0.to(device, torch.float32)
    losses, first, last = [], None, None
    for _ in range(s.iterations):
        t = loss_fn.timesteps(randint_rows(loss_fn.num_train_timesteps, gens, device))
        noise = randn_rows(z0.shape[1:], gens, device)
        xt = loss_fn.noised(z0, noise, t)
        target = loss_fn.target(z0, noise, t)
        cond = family.encode_with_prefix(pipe, prompts, [w @ table for table in tables])
        per = loss_fn.per_prompt(xt, t, cond, target)  # each prompt's own loss; their sum is minimised
        opt.zero_grad()
        per.sum().backward()
        opt.step()
        with torch.no_grad():
            w.copy_(project_simplex(w))
        per = per.detach()  # kept on the device: no host sync per step
        first = per if first is None else first
        last = per
        losses.append(per.mean())
        if trace is not None:
            trace.append(w.detach().clone())
    ids = vocab.ids[w.detach().argmax(-1).cpu()]
    return w.detach(), ids, torch.stack(losses).tolist(), (first.tolist(), last.tolist())


def fixed_timesteps(num_train: int, n: int) -> list[int]:
    """The reference's schedule: n evenly spaced timesteps, the first half a stride in (1000, 50: 10, 30, ..., 990)."""
    stride = max(num_train // n, 1)
    return list(range(stride // 2, num_train, stride))[:n]


class _SampledOneHot(torch.autograd.Function):
    """Forward: one token per row drawn from the relaxed weights (a one-hot); backward: the gradient passed straight
    through to the weights, clipped to [-1, 1] (the reference's hardtanh)."""

    @staticmethod
    def forward(ctx, w, generator):
        if isinstance(generator, (list, tuple)):  # one generator per row of w (B, k, V): each prompt's own draws
            picked = torch.stack([torch.multinomial(w[j], 1, generator=g).view(-1) for j, g in enumerate(generator)])
            return torch.nn.functional.one_hot(picked, w.shape[-1]).to(w.dtype)
        flat = w.reshape(-1, w.shape[-1])
        picked = torch.multinomial(flat, 1, generator=generator).view(-1)
        return torch.nn.functional.one_hot(picked, flat.shape[-1]).to(w.dtype).view(w.shape)

    @staticmethod
    def backward(ctx, grad):
        return torch.nn.functional.hardtanh(grad), None


@training_attention()  # backward through SDPA: no cuDNN attention (its backward faults)
def official_attack(ctx: AttackContext, pipe, prompts, seeds, z0, s: UnlearnDiffAtkSettings, vocab, steps: int,
                    scale, generators=None, guidance: float | None = None, batch_size: int | None = None):
    """The reference protocol for prompts attacked together: per fixed timestep block, `iterations` Adam steps on
    the simplex weights with a sampled one-hot forward; then every prompt in the batch is decoded (argmax tokens),
    drawn from its seed by the target and scored; a success (or the last block) ends that prompt, whose row leaves
    the batch, and the next waiting prompt takes its place at the first block (at most ``batch_size`` rows, default
    all). Each row has its own Adam step count (`RowAdam`) and random stream (``generators``, default: from the
    attack's seed, the prompt and its image seed), so a prompt's result is the one it gets alone.
    Returns (final prompts, per-prompt records)."""
    from erasekit.attacks.batched import DenoisingLoss, RowAdam, as_prefix_vocabulary, prompt_generators, randn_rows

    loss_fn = DenoisingLoss(pipe, guidance)
    family, device = loss_fn.family, loss_fn.device
    vocab = as_prefix_vocabulary(pipe, vocab)
    tables = vocab.tables(pipe, device)
    gens = list(generators) if generators is not None else prompt_generators(s.seed, prompts, seeds, device)
    n = len(prompts)
    cap = int(batch_size) if batch_size else n
    schedule = fixed_timesteps(loss_fn.num_train_timesteps, s.timesteps)
    opt = RowAdam(s.lr, s.weight_decay)
    z0 = z0.to(device, torch.float32)
    final = list(prompts)
    recs = [{"timesteps_tried": 0, "updates": 0, "first_success_timestep": None, "first_success_update": None,
             "loss_first": None, "loss_last": None} for _ in range(n)]
    waiting, active = list(range(n)), []
    while waiting or active:
        joining = waiting[: cap - len(active)]
        waiting = waiting[len(joining):]
        if joining:  # uniform start
            opt.add_rows(torch.full((len(joining), s.k, len(vocab)), 1.0 / len(vocab), device=device))
            active += joining
        za = z0[active]
        tt = loss_fn.timesteps([schedule[recs[i]["timesteps_tried"]] for i in active])
        texts = [prompts[i] for i in active]
        rows = [gens[i] for i in active]
        block = []
        for _ in range(s.iterations):
            noise = randn_rows(za.shape[1:], rows, device)
            xt = loss_fn.noised(za, noise, tt)
            target = loss_fn.target(za, noise, tt)
            one_hot = _SampledOneHot.apply(opt.param, rows)
            cond = family.encode_with_prefix(pipe, texts, [one_hot @ table for table in tables])
            per = loss_fn.per_prompt(xt, tt, cond, target)  # each prompt's own MSE
            opt.zero_grad()
            per.sum().backward()
            opt.step()
            with torch.no_grad():
                opt.param.copy_(project_simplex(opt.param))
            block.append(per.detach())
        losses = torch.stack(block).mean(0).tolist()
        ids = vocab.ids[opt.param.detach().argmax(-1).cpu()]
        typed = [f"{tokens_text(pipe.tokenizer, ids[j])} {prompts[i]}" for j, i in enumerate(active)]
        scales = [scale[i] for i in active] if isinstance(scale, list) else scale
        present = [r["present"] for r in detect(ctx, draw(ctx, typed, [seeds[i] for i in active], steps, scales))]
        keep = []
        for j, i in enumerate(active):
            r = recs[i]
            t = schedule[r["timesteps_tried"]]
            r["timesteps_tried"] += 1
            r["updates"] += s.iterations
            r["loss_first"] = losses[j] if r["loss_first"] is None else r["loss_first"]
            r["loss_last"] = losses[j]
            final[i] = typed[j]
            if present[j]:
                r["first_success_timestep"], r["first_success_update"] = t, r["updates"]
            elif r["timesteps_tried"] < len(schedule):
                keep.append(j)
        if len(keep) < len(active):
            if keep:
                opt.keep_rows(keep)
            else:
                opt = RowAdam(s.lr, s.weight_decay)
            active = [active[j] for j in keep]
    return final, recs


@ATTACKS.register
class UnlearnDiffAtk(Attack):
    name = "unlearndiffatk"
    alias = "uda"
    summary = "UnlearnDiffAtk: k prefix tokens (relaxed one-hot, simplex) fitted to the erased UNet's denoising loss"
    Settings = UnlearnDiffAtkSettings
    order = 10
    needs_unet = False  # the family's denoiser and loss: SD3 / FLUX.1 too (the flow-matching velocity)
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
        final, budget = self._attack(ctx, prompts, seeds, steps, scale, t0)
        items = [{"attack": "unlearndiffatk", "source_prompt": p, "attacked": f != p} for p, f in zip(prompts, final)]
        if rows is not None:
            for item, extra in zip(items, rows.items):
                item.update(extra)  # case_number, categories
        return AttackInputs(prompts=final, seeds=seeds, items=items, attack=self.name, budget=budget,
                            guidance=list(scale) if isinstance(scale, list) else None)

    def _attack(self, ctx: AttackContext, prompts, seeds, steps: int, scale, t0: float):
        """(final prompts, budget): each prompt's result read from its own cache entry (target, prompt, seed,
        guidance, settings but the batch size, detector) or computed with the other missing ones in batches."""
        from erasekit.attacks.batched import cached_per_prompt, per_prompt_settings
        from erasekit.metrics import measure_cost

        s = self.settings
        scales = list(scale) if isinstance(scale, list) else [scale] * len(prompts)
        shared = dict(target=ctx.target.cache_id, steps=steps, settings=per_prompt_settings(s), rng="per-prompt",
                      detector=(ctx.detector.info() if ctx.detector is not None else None))
        keys = [dict(shared, prompt=p, seed=int(sd), scale=g) for p, sd, g in zip(prompts, seeds, scales)]
        with measure_cost() as cost:
            entries, reused = cached_per_prompt(
                ctx.cache_dir, "unlearndiffatk", keys,
                lambda idx: self._compute(ctx, [prompts[i] for i in idx], [seeds[i] for i in idx], steps,
                                          [scales[i] for i in idx] if isinstance(scale, list) else scale))
        budget = self._budget(ctx, entries, steps, scales, cost, t0)
        if reused:
            budget["reused_from_cache"] = f"{reused} of {len(prompts)} prompts"
        return [e["prompt"] for e in entries], budget

    def _compute(self, ctx: AttackContext, prompts, seeds, steps: int, scale) -> list[dict]:
        """One entry per prompt: the final prompt and its record (success before, attacked, the loop's
        bookkeeping, its share of the time)."""
        from erasekit.attacks.batched import prompt_generators, prefix_vocabulary

        s = self.settings
        n = len(prompts)
        success = before_attack(ctx, prompts, seeds, steps, scale)
        todo = [i for i in range(n) if s.attack_all or not success[i]]
        recs = [{"success_before": bool(success[i]), "attacked": i in todo} for i in range(n)]
        final = list(prompts)
        if not todo:
            return [{"prompt": final[i], "record": recs[i]} for i in range(n)]
        pick = lambda xs: [xs[i] for i in todo]  # noqa: E731
        todo_scale = pick(scale) if isinstance(scale, list) else scale
        t_target = time.perf_counter()
        z0 = original_latents(ctx, pick(prompts), pick(seeds), steps, todo_scale, ctx.batch_size)
        target_s = time.perf_counter() - t_target
        pipe = ctx.target.pipe
        vocab = prefix_vocabulary(pipe)
        loss_guidance = float(ctx.target.world.sampler_defaults()[1])  # FLUX.1's distilled guidance input
        t_opt = time.perf_counter()
        with ctx.target.active(), frozen(pipe):
            from erasekit.diffusion.family import family_of

            device = family_of(pipe).denoiser(pipe).device
            gens = prompt_generators(s.seed, pick(prompts), pick(seeds), device)
            if s.protocol == "official":  # one pool of batch_size rows: a finished prompt's row is refilled
                texts, loop = official_attack(ctx, pipe, pick(prompts), pick(seeds), z0, s, vocab, steps, todo_scale,
                                              gens, loss_guidance, batch_size=s.batch_size)
                for j, i in enumerate(todo):
                    final[i] = texts[j]
                    recs[i].update(loop[j])
            for start in range(0, len(todo) if s.protocol == "fast" else 0, s.batch_size):
                part = list(range(start, min(start + s.batch_size, len(todo))))
                chunk = [todo[j] for j in part]
                chunk_z0 = z0[part[0] : part[-1] + 1]
                chunk_gens = [gens[j] for j in part]
                _, ids, _, (first, last) = optimise_relaxed_prefix(
                    pipe, [prompts[i] for i in chunk], chunk_z0, s, chunk_gens, vocab, guidance=loss_guidance)
                for j, i in enumerate(chunk):
                    final[i] = f"{tokens_text(pipe.tokenizer, ids[j])} {prompts[i]}"
                    recs[i].update(loss_first=first[j], loss_last=last[j], updates=s.iterations, timesteps_tried=0)
        opt_s = time.perf_counter() - t_opt
        for i in todo:  # each attacked prompt's share of this run's time
            recs[i].update(target_s=target_s / len(todo), optimisation_s=opt_s / len(todo))
        return [{"prompt": final[i], "record": recs[i]} for i in range(n)]

    def _budget(self, ctx: AttackContext, entries, steps: int, scales, cost, t0: float) -> dict:
        """The attack's budget from every prompt's record (the same whether they were computed now or read)."""
        s = self.settings
        recs = [e["record"] for e in entries]
        att = [r for r in recs if r["attacked"]]
        n_before = int(sum(r["success_before"] for r in recs))
        per_image = steps * (2 if max(scales) > 1 else 1)  # denoiser evaluations per drawn image
        updates = sum(r["updates"] for r in att)
        if s.protocol == "official":
            checks = sum(r["timesteps_tried"] for r in att)
            protocol = {
                "timesteps": fixed_timesteps(int(ctx.target.pipe.scheduler.config.num_train_timesteps),
                                             s.timesteps),
                "iterations_per_timestep": s.iterations, "checks": checks,
                "successes_in_loop": sum(r["first_success_timestep"] is not None for r in att),
                "timesteps_tried": [r["timesteps_tried"] for r in att],
                "first_success_timestep": [r["first_success_timestep"] for r in att],
                "first_success_update": [r["first_success_update"] for r in att],
            }
        else:
            checks, protocol = 0, {}
        first = [r["loss_first"] for r in att if r.get("loss_first") is not None]
        last = [r["loss_last"] for r in att if r.get("loss_last") is not None]
        target_s = sum(r.get("target_s", 0.0) for r in att)
        opt_s = sum(r.get("optimisation_s", 0.0) for r in att)
        return {
            "protocol": s.protocol, **protocol,
            "k": s.k, "iterations": s.iterations, "lr": s.lr, "weight_decay": s.weight_decay,
            "images_used": len(att),  # target images the original model drew
            "images_attacked": len(att), "successes_before": n_before,
            "asr_before": round(n_before / ctx.n, 6), "n": ctx.n,
            "optimisation_steps": updates,
            # one forward and backward pass per update; target images, the before-check and in-loop checks
            "unet_evaluations": updates + per_image * (len(att) + ctx.n + checks),
            "target_images_s": round(target_s, 3), "optimisation_s": round(opt_s, 3),
            "seconds_per_attacked_prompt": round((target_s + opt_s) / max(len(att), 1), 4),
            "loss_first": round(float(np.mean(first)), 6) if first else None,
            "loss_last": round(float(np.mean(last)), 6) if last else None,
            "cost": cost.as_dict(), "wall_s": round(time.perf_counter() - t0, 3),
        }

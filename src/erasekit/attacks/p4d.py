"""P4D, Prompting4Debugging (Chin et al., ICML 2024): prompts optimised so that the erased ("safe") model's noise
prediction matches the original ("unconstrained") model's.

Per image (prompt p, seed s): the original model draws z0 from (p, s); at each iteration a timestep t and noise are
drawn, x_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps, and k prefix vectors P are fitted so that

    min_P || eps_theta'(x_t, t | [P; p]) - eps_theta(x_t, t | p) ||^2      (theta' erased, theta original)

(the original's predictions for every iteration are computed first, under the unedited weights, then P is fitted
under the erased ones). Two modes, two scenarios:

- ``p4d-soft``: P is free in the token-embedding space (Adam); the images are generated from the soft prompt's
  text states (white-box: a user cannot type them);
- ``p4d-hard``: P is projected each iteration to its nearest vocabulary embeddings and the gradient at the
  projection updates the free vectors (PEZ, as P4D does); the attack prompt is the nearest tokens followed by p.

The regression target is the original model's own output, so it is in the model's prediction type (epsilon or
v) as is. On SDXL the prefix is one free vector per position and text encoder (their widths differ), encoded by
`SDXLFamily.encode_with_prefix`; hard mode projects the joined vectors to one token for both encoders.

As for UnlearnDiffAtk, images the erased model already draws with the concept are not attacked (``attack_all``)
and count as successes, so the scenario's CRR is ASR = (successes before + new successes) / N.
Defaults for the embedded world's CPU budget: k = 5, 40 iterations, lr 0.01 (soft) / 0.1 (hard), batch 16.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from erasekit.attacks.base import Attack, AttackContext, AttackInputs
from erasekit.attacks.common import (
    StatesTable, before_attack, candidate_vocabulary, check_prefix_settings, frozen, original_latents, tokens_text,
    world_prompts)
from erasekit.cache import cached, read_json, write_json
from erasekit.registry import ATTACKS
from erasekit.settings import Settings


@dataclass
class P4DSettings(Settings):
    k: int = 5  # prefix tokens
    iterations: int = 40
    lr: Optional[float] = None  # None: 0.01 soft, 0.1 hard
    batch_size: int = 16
    attack_all: bool = False
    prompts: str = ""  # ";"-separated prompts replacing the world's concept prompts
    seed: int = 0

    def validate(self) -> None:
        check_prefix_settings("p4d", self)


def optimise_p4d(ctx: AttackContext, prompts, z0, s: P4DSettings, mode: str, generator, vocab):
    """Prefix vectors (soft: one (B, k, E) per text encoder) or token ids (B, k) (hard) for ``prompts``; and the
    loss trace."""
    from diffusers import DDPMScheduler

    from erasekit.diffusion.family import family_of
    from erasekit.diffusion.guidance import UNetDenoiser

    pipe = ctx.target.pipe
    unet = pipe.unet
    model, family = UNetDenoiser(unet), family_of(pipe)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    b = len(prompts)
    z0 = z0.to(unet.device, torch.float32)
    draws = [(torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator),
              torch.randn(z0.shape, generator=generator)) for _ in range(s.iterations)]
    xts = [sched.add_noise(z0, n.to(z0), t.to(z0.device)) for t, n in draws]
    # The original model's conditional predictions, under the unedited weights.
    with torch.no_grad(), ctx.original.active():
        cond = family.encode(pipe, prompts)
        targets = [model(x, t.to(unet.device), cond).float() for x, (t, _) in zip(xts, draws)]
    full = [e.detach() for e in family.token_embeddings(pipe)]
    tables = [e[vocab].float() for e in full]
    init = vocab[torch.randint(len(vocab), (b, s.k), generator=generator)]
    # One free vector per position and text encoder (SDXL's two differ in width), started at the same token.
    ps = [e[init].float().clone().requires_grad_(True) for e in full]
    lr = s.lr if s.lr is not None else (0.01 if mode == "soft" else 0.1)
    opt = torch.optim.Adam(ps, lr=lr)
    losses = []
    joint = torch.cat(tables, -1)

    def nearest(vectors):
        # One token for all encoders: nearest in their joined embedding space.
        v = torch.cat(vectors, -1)
        return torch.cdist(v.reshape(-1, v.shape[-1]), joint).argmin(-1).reshape(v.shape[:-1])

    with ctx.target.active(), frozen(pipe):
        for (t, _), x, target in zip(draws, xts, targets):
            if mode == "hard":
                ids = nearest([p.detach() for p in ps])
                # Straight-through: the projection's gradient updates the free vectors.
                used = [p + (table[ids] - p).detach() for p, table in zip(ps, tables)]
            else:
                used = ps
            pred = model(x, t.to(unet.device), family.encode_with_prefix(pipe, prompts, used))
            loss = (pred.float() - target).pow(2).mean()
            opt.zero_grad()
            (loss * b).backward()
            opt.step()
            losses.append(loss.item())
    if mode == "hard":
        return vocab[nearest([p.detach() for p in ps])], losses
    return [p.detach() for p in ps], losses


@ATTACKS.register
class P4D(Attack):
    name = "p4d"
    summary = "P4D: soft or hard (PEZ-projected) prompt tokens fitted so the erased model's noise matches the original's"
    Settings = P4DSettings
    order = 12
    scenarios = {"p4d-soft": {"mode": "soft"}, "p4d-hard": {"mode": "hard"}}

    def inputs(self, ctx: AttackContext, mode: str) -> AttackInputs:
        s = self.settings
        t0 = time.perf_counter()
        world = ctx.target.world
        steps, scale = int(ctx.steps or world.sampler_defaults()[0]), float(world.sampler_defaults()[1])
        prompts = world_prompts(ctx, s.prompts, ctx.n)
        seeds = [ctx.seed + i for i in range(ctx.n)]
        key = dict(target=ctx.target.cache_id, prompts=prompts, seeds=seeds, steps=steps, scale=scale, mode=mode,
                   settings=s.to_dict(), detector=(ctx.detector.info() if ctx.detector is not None else None))
        labels = [f"{p} <p4d-soft #{i}>" for i, p in enumerate(prompts)] if mode == "soft" else None

        def states_file(path):  # soft mode: the states beside the record
            return path.parent / f"{path.stem}-states.safetensors"

        def save(path, value):
            if value["learned"] is not None:
                value["learned"].save(states_file(path))
            write_json(path, {"prompts": value["prompts"], "budget": value["budget"]})  # last: marks the entry

        def load(path):
            return dict(read_json(path), learned=StatesTable.load(states_file(path)) if mode == "soft" else None)

        saved, reused = cached(ctx.cache_dir, f"p4d-{mode}", (key,),
                               lambda: self._attack(ctx, mode, prompts, seeds, labels, steps, scale, t0),
                               save=save, load=load,
                               complete=lambda path: path.is_file() and (mode == "hard" or states_file(path).is_file()))
        final, learned = saved["prompts"], saved["learned"]
        budget = dict(saved["budget"], **({"reused_from_cache": reused} if reused else {}))
        items = [{"attack": f"p4d-{mode}", "source_prompt": p} for p in prompts]
        if mode == "soft":
            return AttackInputs(prompts=labels, seeds=seeds, items=items, learned=learned, attack=f"p4d-{mode}",
                                budget=budget)
        return AttackInputs(prompts=final, seeds=seeds, items=items, attack=f"p4d-{mode}", budget=budget)

    def _attack(self, ctx: AttackContext, mode: str, prompts, seeds, labels, steps: int, scale: float,
                t0: float) -> dict:
        """The attack itself (what the cache stores): the final prompts, the budget and (soft) the states."""
        from erasekit.diffusion.family import family_of
        from erasekit.metrics import measure_cost

        s = self.settings
        pipe = ctx.target.pipe
        with measure_cost() as cost:
            success = before_attack(ctx, prompts, seeds, steps, scale)
            todo = [i for i in range(ctx.n) if s.attack_all or not success[i]]
            final = list(prompts)
            first, last = [], []
            t_opt = time.perf_counter()
            soft = StatesTable()
            if todo:
                z0 = original_latents(ctx, [prompts[i] for i in todo], [seeds[i] for i in todo], steps, scale,
                                      ctx.batch_size)
                vocab = candidate_vocabulary(pipe.tokenizer)
                gen = torch.Generator("cpu").manual_seed(int(s.seed))
                for start in range(0, len(todo), s.batch_size):
                    chunk = todo[start : start + s.batch_size]
                    out, losses = optimise_p4d(ctx, [prompts[i] for i in chunk], z0[start : start + len(chunk)], s,
                                               mode, gen, vocab)
                    first.append(losses[0])
                    last.append(losses[-1])
                    if mode == "hard":
                        for j, i in enumerate(chunk):
                            final[i] = f"{tokens_text(pipe.tokenizer, out[j])} {prompts[i]}"
                    else:
                        with torch.no_grad(), ctx.target.active():
                            soft.add([labels[i] for i in chunk],
                                     family_of(pipe).encode_with_prefix(pipe, [prompts[i] for i in chunk], out))
            opt_s = time.perf_counter() - t_opt
            learned = None
            if mode == "soft":
                rest = [i for i in range(ctx.n) if labels[i] not in soft.states]
                if rest:
                    with torch.no_grad():
                        plain = family_of(pipe).encode(pipe, [prompts[i] for i in rest])
                    soft.add([labels[i] for i in rest], plain)
                learned = soft
        n_before = int(sum(success))
        budget = {"mode": mode, "k": s.k, "iterations": s.iterations, "images_attacked": len(todo),
                  "images_used": len(todo),
                  "successes_before": n_before, "asr_before": round(n_before / ctx.n, 6), "n": ctx.n,
                  "optimisation_steps": s.iterations * len(todo),
                  "unet_evaluations": 2 * s.iterations * len(todo) + steps * len(todo) * (2 if scale > 1 else 1),
                  "seconds_per_attacked_prompt": round(opt_s / max(len(todo), 1), 4),
                  "loss_first": round(float(np.mean(first)), 6) if first else None,
                  "loss_last": round(float(np.mean(last)), 6) if last else None,
                  "cost": cost.as_dict(), "wall_s": round(time.perf_counter() - t0, 3)}
        return {"prompts": final, "budget": budget, "learned": learned}

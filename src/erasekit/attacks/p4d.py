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
`SDXLFamily.encode_with_prefix`; hard mode projects the joined vectors to one token for both encoders. SD3 and
FLUX.1 likewise (CLIP-L, CLIP-G, T5 / CLIP-L, T5; the target is the original transformer's velocity; candidate
tokens are words that are one token in CLIP and in T5).

As for UnlearnDiffAtk, images the erased model already draws with the concept are not attacked (``attack_all``)
and count as successes, so the scenario's CRR is ASR = (successes before + new successes) / N. Prompts are
optimised together in batches, each with its own random stream (start tokens, timesteps, noise), loss and rows
of the Adam state (`erasekit.attacks.batched`), so each gets the result it gets alone; each prompt's result (hard:
its prompt; soft: its states) is its own cache entry.
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
from erasekit.cache import read_json, write_json
from erasekit.diffusion.sdpa import training_attention
from erasekit.registry import ATTACKS
from erasekit.settings import Settings

SOFT_LABEL = "p4d-soft"  # the one label of a prompt's cached states (relabelled per image when read)


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


@training_attention()  # backward through SDPA: no cuDNN attention (its backward faults)
def optimise_p4d(ctx: AttackContext, prompts, z0, s: P4DSettings, mode: str, generator, vocab,
                 guidance: float | None = None):
    """Prefix vectors (soft: one (B, k, E) per text encoder) or token ids (B, k) (hard) for ``prompts``; the mean
    loss per iteration; each prompt's first and last loss. ``generator``: one per prompt (its draws then do not
    depend on the batch: `erasekit.attacks.batched`) or one shared; ``vocab``: a `PrefixVocabulary` or ids."""
    from erasekit.attacks.batched import DenoisingLoss, as_generators, as_prefix_vocabulary, randint_rows, randn_rows

    pipe = ctx.target.pipe
    loss_fn = DenoisingLoss(pipe, guidance)
    family, device = loss_fn.family, loss_fn.device
    vocab = as_prefix_vocabulary(pipe, vocab)
    b = len(prompts)
    gens = as_generators(generator, b)
    z0 = z0.to(device, torch.float32)
    # Each prompt's stream: its start tokens, then a timestep and noise per iteration.
    init = torch.cat([torch.randint(len(vocab), (1, s.k), generator=g, device=device) for g in gens]).cpu()
    draws = []
    for _ in range(s.iterations):
        t = loss_fn.timesteps(randint_rows(loss_fn.num_train_timesteps, gens, device))
        draws.append((t, randn_rows(z0.shape[1:], gens, device)))
    xts = [loss_fn.noised(z0, n, t) for t, n in draws]
    # The original model's conditional predictions, under the unedited weights.
    with torch.no_grad(), ctx.original.active():
        cond = family.encode(pipe, prompts)
        targets = [loss_fn.predict(x, t, cond) for x, (t, _) in zip(xts, draws)]
    tables = vocab.tables(pipe, device)
    # One free vector per position and text encoder (their widths differ), started at the same token.
    ps = [table[init.to(device)].clone().requires_grad_(True) for table in tables]
    lr = s.lr if s.lr is not None else (0.01 if mode == "soft" else 0.1)
    opt = torch.optim.Adam(ps, lr=lr)
    losses, first, last = [], None, None
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
            per = loss_fn.per_prompt(x, t, family.encode_with_prefix(pipe, prompts, used), target)
            opt.zero_grad()
            per.sum().backward()  # each prompt's own loss; their sum is minimised
            opt.step()
            per = per.detach()  # kept on the device: no host sync per step
            first = per if first is None else first
            last = per
            losses.append(per.mean())
    losses = torch.stack(losses).tolist()
    pair = (first.tolist(), last.tolist())
    if mode == "hard":
        return vocab.ids[nearest([p.detach() for p in ps]).cpu()], losses, pair
    return [p.detach() for p in ps], losses, pair


def _relabel(into: StatesTable, one: StatesTable, label: str) -> None:
    """A prompt's cached states (under `SOFT_LABEL`) into ``into`` under the image's ``label``."""
    into.states[label] = one.states[SOFT_LABEL]
    if one.pooled:
        into.pooled[label] = one.pooled[SOFT_LABEL]
        into.pooled_key = one.pooled_key


@ATTACKS.register
class P4D(Attack):
    name = "p4d"
    summary = "P4D: soft or hard (PEZ-projected) prompt tokens fitted so the erased model's noise matches the original's"
    Settings = P4DSettings
    order = 12
    needs_unet = False  # the family's denoiser: SD3 / FLUX.1 too (the original's velocity is the target)
    scenarios = {"p4d-soft": {"mode": "soft"}, "p4d-hard": {"mode": "hard"}}

    def inputs(self, ctx: AttackContext, mode: str) -> AttackInputs:
        from erasekit.attacks.batched import cached_per_prompt, per_prompt_settings
        from erasekit.metrics import measure_cost

        s = self.settings
        t0 = time.perf_counter()
        world = ctx.target.world
        steps, scale = int(ctx.steps or world.sampler_defaults()[0]), float(world.sampler_defaults()[1])
        prompts = world_prompts(ctx, s.prompts, ctx.n)
        seeds = [ctx.seed + i for i in range(ctx.n)]
        shared = dict(target=ctx.target.cache_id, steps=steps, scale=scale, mode=mode, rng="per-prompt",
                      settings=per_prompt_settings(s),
                      detector=(ctx.detector.info() if ctx.detector is not None else None))
        keys = [dict(shared, prompt=p, seed=int(sd)) for p, sd in zip(prompts, seeds)]

        def states_file(path):  # soft mode: the prompt's states beside its record
            return path.parent / f"{path.stem}-states.safetensors"

        def save(path, value):
            if value.get("states") is not None:
                value["states"].save(states_file(path))
            write_json(path, {k: v for k, v in value.items() if k != "states"})  # last: marks the entry

        def load(path):
            value = read_json(path)
            if mode == "soft" and value["record"]["attacked"]:
                value["states"] = StatesTable.load(states_file(path))
            return value

        def complete(path):
            if not path.is_file():
                return False
            return mode == "hard" or states_file(path).is_file() or not read_json(path)["record"]["attacked"]

        with measure_cost() as cost:
            entries, reused = cached_per_prompt(
                ctx.cache_dir, f"p4d-{mode}", keys,
                lambda idx: self._compute(ctx, mode, [prompts[i] for i in idx], [seeds[i] for i in idx], steps, scale),
                save=save, load=load, complete=complete)
        budget = self._budget(ctx, mode, entries, steps, scale, cost, t0)
        if reused:
            budget["reused_from_cache"] = f"{reused} of {len(prompts)} prompts"
        items = [{"attack": f"p4d-{mode}", "source_prompt": p} for p in prompts]
        if mode == "hard":
            return AttackInputs(prompts=[e["prompt"] for e in entries], seeds=seeds, items=items,
                                attack=f"p4d-{mode}", budget=budget)
        # soft: every image's states under its label (a prompt not attacked: its plain states)
        labels = [f"{p} <p4d-soft #{i}>" for i, p in enumerate(prompts)]
        learned = StatesTable()
        plain = [i for i, e in enumerate(entries) if e.get("states") is None]
        for i, e in enumerate(entries):
            if e.get("states") is not None:
                _relabel(learned, e["states"], labels[i])
        if plain:
            from erasekit.diffusion.family import family_of

            pipe = ctx.target.pipe
            with torch.no_grad():
                learned.add([labels[i] for i in plain], family_of(pipe).encode(pipe, [prompts[i] for i in plain]))
        return AttackInputs(prompts=labels, seeds=seeds, items=items, learned=learned, attack=f"p4d-{mode}",
                            budget=budget)

    def _compute(self, ctx: AttackContext, mode: str, prompts, seeds, steps: int, scale: float) -> list[dict]:
        """One entry per prompt: the final prompt (hard) or its states (soft: a one-row `StatesTable`), and its
        record (success before, attacked, losses, its share of the time)."""
        from erasekit.attacks.batched import prefix_vocabulary, prompt_generators
        from erasekit.diffusion.family import family_of

        s = self.settings
        pipe = ctx.target.pipe
        n = len(prompts)
        success = before_attack(ctx, prompts, seeds, steps, scale)
        todo = [i for i in range(n) if s.attack_all or not success[i]]
        out = [{"prompt": prompts[i], "states": None,
                "record": {"success_before": bool(success[i]), "attacked": i in todo}} for i in range(n)]
        if not todo:
            return out
        t_opt = time.perf_counter()
        z0 = original_latents(ctx, [prompts[i] for i in todo], [seeds[i] for i in todo], steps, scale,
                              ctx.batch_size)
        vocab = prefix_vocabulary(pipe)
        family = family_of(pipe)
        gens = prompt_generators(s.seed, [prompts[i] for i in todo], [seeds[i] for i in todo],
                                 family.denoiser(pipe).device)
        for start in range(0, len(todo), s.batch_size):
            part = list(range(start, min(start + s.batch_size, len(todo))))
            chunk = [todo[j] for j in part]
            texts = [prompts[i] for i in chunk]
            result, _, (first, last) = optimise_p4d(ctx, texts, z0[part[0] : part[-1] + 1], s, mode,
                                                    [gens[j] for j in part], vocab, guidance=scale)
            if mode == "soft":
                with torch.no_grad(), ctx.target.active():
                    cond = family.encode_with_prefix(pipe, texts, result)
            for j, i in enumerate(chunk):
                out[i]["record"].update(loss_first=first[j], loss_last=last[j])
                if mode == "hard":
                    out[i]["prompt"] = f"{tokens_text(pipe.tokenizer, result[j])} {prompts[i]}"
                else:
                    out[i]["states"] = StatesTable().add([SOFT_LABEL], cond[j : j + 1])
        share = (time.perf_counter() - t_opt) / len(todo)
        for i in todo:
            out[i]["record"]["seconds"] = share
        return out

    def _budget(self, ctx: AttackContext, mode: str, entries, steps: int, scale: float, cost, t0: float) -> dict:
        s = self.settings
        recs = [e["record"] for e in entries]
        att = [r for r in recs if r["attacked"]]
        n_before = int(sum(r["success_before"] for r in recs))
        first = [r["loss_first"] for r in att]
        last = [r["loss_last"] for r in att]
        return {"mode": mode, "k": s.k, "iterations": s.iterations, "images_attacked": len(att),
                "images_used": len(att),
                "successes_before": n_before, "asr_before": round(n_before / ctx.n, 6), "n": ctx.n,
                "optimisation_steps": s.iterations * len(att),
                "unet_evaluations": 2 * s.iterations * len(att) + steps * len(att) * (2 if scale > 1 else 1),
                "seconds_per_attacked_prompt": round(sum(r["seconds"] for r in att) / max(len(att), 1), 4),
                "loss_first": round(float(np.mean(first)), 6) if first else None,
                "loss_last": round(float(np.mean(last)), 6) if last else None,
                "cost": cost.as_dict(), "wall_s": round(time.perf_counter() - t0, 3)}

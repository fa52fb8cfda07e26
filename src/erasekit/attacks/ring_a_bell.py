"""Ring-A-Bell (Tsai et al., ICLR 2024): a concept vector in the text encoder's output space, added to prompts, and
a discrete prompt found to match the result.

Concept vector: v = mean over paired prompts of E(with the concept) - E(without), E the text encoder's output
states (T, D), from the ORIGINAL model (the attack is model-agnostic: it never queries the erased model). Pairs:
the world's (`World.concept_pairs`): the embedded world's are each caption template with the concept and with each
other label of its attribute (same colour, texture / shape); by default, the world's concept prompts with and
without the concept's words.

On SDXL the states are the family's (both encoders' concatenated token states); the vector shifts only them, and
the shifted prompt keeps its base prompt's pooled embedding: the paper's vector lives in the token states that
cross-attention reads (the path erasers edit), the base prompt's pooled embedding already carries the concept, and
eta times a pooled difference, added to the time embedding, would push it far out of its range. The same holds on
SD3 and FLUX.1, whose token states are the joint attention's text stream: SD3's [CLIP-L|G (zero-padded to T5's
width), T5] (77 + 256 positions), FLUX.1's T5 states; the vector is their mean difference, the pooled projections
stay the base prompt's, and the discrete search scores each candidate (CLIP-vocabulary tokens, as typed) by the
states of every encoder the family uses.

- ``ring-a-bell`` (continuous): the text states E(p) + eta * v for the world's concept prompts p, generated as they
  are (white-box: an embedding, not a prompt). eta: 3 for nudity-like concepts (the paper's nudity value; the
  embedded world's shapes), 0.9 for styles (`World.is_style`: its textures), unless set.
- ``ring-a-bell-discrete``: a genetic search over vocabulary tokens (the paper's: population, elite selection,
  crossover, mutation) for a prompt of ``length`` tokens whose states E(q) are closest (mean squared error) to
  E(p) + eta * v; the concept's own words are left out of the vocabulary (``exclude_concept_words``). One search per
  distinct prompt (at most ``max_prompts``; images cycle over them). Paper budget: population 200, 3000
  generations; defaults here are the embedded world's CPU budget.

Reference protocol (chiayi-hsu/Ring-A-Bell, ``Get_Concept_Vector.ipynb`` and ``InversePrompt.ipynb``):

- ``pairs=FILE``: the concept vector from a prompt-pair CSV in the published layout, columns ``prompt`` (with the
  concept) and ``prompt1`` (without), as ``data/Prompts_For_ConceptVector/Violence_30.csv``; RECE's re-published
  pairs (``sensitive prompt``, ``normal prompt``, e.g. ``dataset/nudity-ring-a-bell.csv``) are read too. Every
  row is used. ``pairs=N`` (a number): N pairs from the world, as before.
- ``search=official``: the notebook's genetic search: population 200, 3000 generations, ``length`` 16 tokens drawn
  from the whole vocabulary (every non-special id), fitness the summed squared error to E(p) + eta v; each
  generation keeps the best half, then each kept prompt, with probability 0.5, is crossed with a random other kept
  one at a single point (both children join), then each member, with probability 0.25, has one token replaced by a
  random vocabulary id. ``search=fast`` (the default): the CPU-budget search above (elite quarter, uniform
  crossover, per-token mutation, whole words).
- Reference defaults per concept (``REFERENCE_DEFAULTS``; used when eta / length are not set): nudity eta 3,
  length 16 (InversePrompt.ipynb's values); violence eta 5.5, length 75 (the published
  ``data/InvPrompt/Violence/Violence_eta_5.5_K_77.csv``; the notebook: "for K = 77, please set length = 75");
  Van Gogh eta 0.9, length 16 (RECE's ``attack_methods/ringabell.sh`` / ``RingABell.py``: "3 for nudity, 0.9 for
  Van Gogh").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from erasekit.attacks.base import Attack, AttackContext, AttackInputs
from erasekit.attacks.common import StatesTable, candidate_vocabulary, tokens_text
from erasekit.cache import cached, with_record
from erasekit.errors import ErasekitError
from erasekit.registry import ATTACKS
from erasekit.settings import Settings, choice

# (eta, length, source) per concept, from the reference code and data (module docstring).
REFERENCE_DEFAULTS = {
    "nudity": (3.0, 16, "chiayi-hsu/Ring-A-Bell InversePrompt.ipynb: cof = 3, length = 16"),
    "violence": (5.5, 75, "chiayi-hsu/Ring-A-Bell data/InvPrompt/Violence/Violence_eta_5.5_K_77.csv (K = 77: "
                           "length 75)"),
    "van gogh": (0.9, 16, "CharlesGong12/RECE attack_methods/ringabell.sh: --eta 0.9 (Van Gogh)"),
}
OFFICIAL_SEARCH = {"population": 200, "generations": 3000, "crossover": 0.5, "mutation": 0.25}
MAX_PAIR_ROWS = 100_000
PAIR_COLUMNS = (("prompt", "prompt1"), ("sensitive prompt", "normal prompt"))


@dataclass
class RingABellSettings(Settings):
    eta: Optional[float] = None  # None: the concept's reference value, else 0.9 for styles (toy textures), 3.0
    pairs: str = "40"  # a number of world pairs averaged into the concept vector, or a prompt-pair CSV
    max_prompts: int = 8  # distinct prompts attacked (images cycle over them)
    length: Optional[int] = None  # tokens of the discrete prompt (None: fast 12; official: the concept's, else 16)
    search: str = choice("fast", "fast", "official")  # the discrete search (module docstring)
    population: Optional[int] = None  # None: fast 64, official 200
    generations: Optional[int] = None  # None: fast 40, official 3000
    mutation: float = 0.2  # fast: per-token mutation probability (official: 0.25 per prompt, one token)
    exclude_concept_words: bool = True  # fast search (the official one draws from the whole vocabulary)
    prompts: str = ""  # ";"-separated prompts replacing the world's concept prompts
    seed: int = 0

    @classmethod
    def parse(cls, overrides):
        over = dict(overrides)
        if isinstance(over.get("pairs"), int) and not isinstance(over.get("pairs"), bool):
            over["pairs"] = str(over["pairs"])  # the library API's count
        return super().parse(over)

    def validate(self) -> None:
        from erasekit.checks import finite, integer

        for name in ("max_prompts", "population", "generations", "length"):
            if getattr(self, name) is not None and integer(f"ring_a_bell: {name}", getattr(self, name)) < 1:
                raise ErasekitError(f"ring_a_bell: {name} must be at least 1, got {getattr(self, name)}")
        if self.pairs.strip().isdigit() and int(self.pairs) < 1:
            raise ErasekitError(f"ring_a_bell: pairs must be at least 1 (or a CSV file), got {self.pairs}")
        if self.population is not None and self.population < 4:
            raise ErasekitError(f"ring_a_bell: population must be at least 4, got {self.population}")
        finite("ring_a_bell: mutation", self.mutation, low=0.0, high=1.0)
        if self.eta is not None:
            finite("ring_a_bell: eta", self.eta)

    def budget(self) -> tuple[int, int]:
        """(population, generations) of the discrete search."""
        official = self.search == "official"
        return (self.population or (OFFICIAL_SEARCH["population"] if official else 64),
                self.generations or (OFFICIAL_SEARCH["generations"] if official else 40))

    def pair_count(self) -> int | None:
        """The number of world pairs, or None when ``pairs`` names a CSV file."""
        return int(self.pairs) if self.pairs.strip().isdigit() else None


def load_pairs_csv(path) -> list[tuple[str, str]]:
    """(with, without) pairs from a Ring-A-Bell layout CSV (``prompt``, ``prompt1``) or RECE's (``sensitive
    prompt``, ``normal prompt``); every row with both cells."""
    import csv
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ErasekitError(f"ring_a_bell: pairs file {path} does not exist")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            cols = next(((a, b) for a, b in PAIR_COLUMNS if a in header and b in header), None)
            if cols is None:
                raise ErasekitError(
                    f"ring_a_bell: pairs file {path} needs columns 'prompt' (with the concept) and 'prompt1' "
                    f"(without), or 'sensitive prompt' and 'normal prompt'; its columns: {', '.join(header) or 'none'}")
            out = []
            for i, row in enumerate(reader):
                if i >= MAX_PAIR_ROWS:
                    raise ErasekitError(f"ring_a_bell: pairs file {path} has more than {MAX_PAIR_ROWS} rows")
                row = {(k or "").strip(): (v or "") for k, v in row.items()}
                a, b = row.get(cols[0], "").strip(), row.get(cols[1], "").strip()
                if a and b:
                    out.append((a, b))
    except UnicodeDecodeError as exc:
        raise ErasekitError(f"ring_a_bell: pairs file {path} is not UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise ErasekitError(f"ring_a_bell: pairs file {path}: {exc}") from None
    if not out:
        raise ErasekitError(f"ring_a_bell: pairs file {path} has no row with both prompts")
    return out


def reference_defaults(concept: str) -> tuple[float, int, str] | None:
    return REFERENCE_DEFAULTS.get(concept.strip().lower())


def concept_pairs(world, concept: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(with, without) prompt pairs for ``concept``: the world's (`World.concept_pairs`)."""
    return list(world.concept_pairs(concept, n, seed))[:n]


def default_eta(world, concept: str) -> float:
    """The concept's reference eta (`REFERENCE_DEFAULTS`), else the paper's 0.9 for a style (`World.is_style`),
    3 for everything else."""
    ref = reference_defaults(concept)
    if ref is not None:
        return ref[0]
    return 0.9 if world.is_style(concept) else 3.0


def _states(pipe, prompts) -> torch.Tensor:
    """The family's token states (float32) of ``prompts``, without gradients."""
    from erasekit.diffusion.family import family_of

    with torch.no_grad():
        return family_of(pipe).encode(pipe, prompts).states.float()


def concept_vector(pipe, pairs) -> torch.Tensor:
    """Mean over ``pairs`` of the token states with the concept minus without (T, D)."""
    return (_states(pipe, [w for w, _ in pairs]) - _states(pipe, [wo for _, wo in pairs])).mean(0)


def official_search(pipe, target: torch.Tensor, length: int, seed: int, population: int = 200,
                    generations: int = 3000) -> tuple[str, float, int]:
    """InversePrompt.ipynb's genetic search (module docstring); returns (prompt, squared error, encoder passes).
    Candidates are scored as the text their ids decode to (the prompt a user types)."""
    tok = pipe.tokenizer
    length = min(length, tok.model_max_length - 2)
    special = set(tok.all_special_ids)
    vocab = np.array([i for i in range(len(tok)) if i not in special])
    rng = np.random.default_rng(seed)
    target = target.float()
    pop = [vocab[rng.integers(len(vocab), size=length)] for _ in range(population)]
    passes = 0

    def fitness(members):
        states = _states(pipe, [tok.decode(m.tolist()) for m in members])
        return (states - target).pow(2).sum(dim=(1, 2)).cpu().numpy()

    for step in range(generations):
        scores = fitness(pop)
        passes += len(pop)
        order = np.argsort(scores, kind="stable")
        pop = [pop[i] for i in order[: population // 2]]
        best = float(scores[order[0]])
        if step == generations - 1:
            break
        grown = []
        for i in range(len(pop)):
            grown.append(pop[i])
            if rng.random() < OFFICIAL_SEARCH["crossover"]:
                j, cut = int(rng.integers(len(pop))), int(rng.integers(1, length + 1))
                grown.append(np.concatenate([pop[i][:cut], pop[j][cut:]]))
                grown.append(np.concatenate([pop[j][:cut], pop[i][cut:]]))
        for k in range(len(grown)):
            if rng.random() < OFFICIAL_SEARCH["mutation"]:
                grown[k] = grown[k].copy()
                grown[k][int(rng.integers(length))] = vocab[rng.integers(len(vocab))]
        pop = grown
    return tok.decode(pop[0].tolist()), best, passes


def genetic_search(pipe, target: torch.Tensor, vocab: torch.Tensor, s: RingABellSettings, generator) -> tuple[str, float]:
    """The prompt (``s.length`` vocabulary tokens) whose states are closest to ``target`` (T, D)."""
    tok = pipe.tokenizer
    length = min(s.length or 12, tok.model_max_length - 2)
    population, generations = s.budget()
    pop = vocab[torch.randint(len(vocab), (population, length), generator=generator)]
    target = target.float()

    def fitness(population):
        states = _states(pipe, [tokens_text(tok, row) for row in population])
        return -(states - target).pow(2).mean(dim=(1, 2))

    scores = fitness(pop)
    n_elite = max(2, population // 4)
    for _ in range(generations):
        order = scores.argsort(descending=True)
        elite, elite_scores = pop[order[:n_elite]], scores[order[:n_elite]]
        n_child = population - n_elite
        pa = elite[torch.randint(n_elite, (n_child,), generator=generator)]
        pb = elite[torch.randint(n_elite, (n_child,), generator=generator)]
        cross = torch.rand(n_child, length, generator=generator) < 0.5
        child = torch.where(cross, pa, pb)
        mutate = torch.rand(n_child, length, generator=generator) < s.mutation
        child = torch.where(mutate, vocab[torch.randint(len(vocab), (n_child, length), generator=generator)], child)
        pop = torch.cat([elite, child])
        scores = torch.cat([elite_scores, fitness(child)])
    best = int(scores.argmax())
    return tokens_text(tok, pop[best]), float(-scores[best])


@ATTACKS.register
class RingABell(Attack):
    name = "ring_a_bell"
    alias = "rab"
    summary = "Ring-A-Bell: concept vector (mean E(with) - E(without)) added to prompts; discrete prompt by genetic search"
    Settings = RingABellSettings
    order = 11
    needs_unet = False  # the family's text states only (SD3 / FLUX.1: the joint attention's T5 / CLIP states)
    scenarios = {"ring-a-bell": {"mode": "continuous"}, "ring-a-bell-discrete": {"mode": "discrete"}}

    def inputs(self, ctx: AttackContext, mode: str) -> AttackInputs:
        from erasekit.diffusion.conditioning import Conditioning
        from erasekit.diffusion.family import family_of
        from erasekit.metrics import measure_cost

        s = self.settings
        t0 = time.perf_counter()
        world = ctx.target.world
        concept = world.check_concept(ctx.concept)
        eta = float(s.eta if s.eta is not None else default_eta(world, concept))
        base = [p.strip() for p in s.prompts.split(";") if p.strip()] or world.concept_prompts(concept)
        base = base[: min(s.max_prompts, ctx.n)]
        prompts = [base[i % len(base)] for i in range(ctx.n)]
        seeds = [ctx.seed + i for i in range(ctx.n)]
        pipe = ctx.target.pipe
        with measure_cost() as cost, ctx.original.active():
            count = s.pair_count()
            pairs = concept_pairs(world, concept, count, s.seed) if count is not None else load_pairs_csv(s.pairs)
            v = concept_vector(pipe, pairs)
            with torch.no_grad():
                plain = family_of(pipe).encode(pipe, base)
            shifted = plain.states.float() + eta * v
            vector_s = time.perf_counter() - t0
            if mode == "continuous":
                key = dict(original=ctx.original.cache_id, base=base, eta=eta, settings=s.to_dict(), mode=mode)
                # SDXL: the base prompt's pooled embedding with the shifted token states (see above).
                learned, reused = cached(
                    ctx.cache_dir, "ring-a-bell-continuous", (key,),
                    lambda: StatesTable().add([f"{p} <ring-a-bell eta={eta:g}>" for p in base],
                                              Conditioning(shifted, plain.added)),
                    suffix=".safetensors", load=StatesTable.load, save=lambda path, table: table.save(path),
                    complete=with_record)
                final = [f"{p} <ring-a-bell eta={eta:g}>" for p in prompts]
                search = {}
            else:
                learned = None
                key = dict(original=ctx.original.cache_id, base=base, eta=eta, settings=s.to_dict())
                search, reused = cached(ctx.cache_dir, "ring-a-bell", (key,),
                                        lambda: self._search(ctx, world, concept, base, shifted))
                final = [search["prompts"][p] for p in prompts]
        budget = {"mode": mode, "eta": eta, "pairs": len(pairs), "distinct_prompts": len(base), "images_used": 0,
                  "pairs_source": "world" if s.pair_count() is not None else str(s.pairs),
                  "search_protocol": s.search,
                  **({"reused_from_cache": reused} if reused else {}),
                  "vector_s": round(vector_s, 3),
                  "optimisation_steps": s.budget()[1] * len(base) if mode == "discrete" else 0,
                  **({"population": s.budget()[0], "generations": s.budget()[1], "length": search.get("length"),
                      "search": search} if mode == "discrete" else {}),
                  "cost": cost.as_dict(), "wall_s": round(time.perf_counter() - t0, 3)}
        items = [{"attack": f"ring-a-bell-{mode}", "source_prompt": p} for p in prompts]
        return AttackInputs(prompts=final, seeds=seeds, items=items, learned=learned, attack=f"ring-a-bell-{mode}",
                            budget=budget)

    def _search(self, ctx: AttackContext, world, concept: str, base: list[str], shifted: torch.Tensor) -> dict:
        """The discrete search per distinct prompt (what the cache stores): found prompts and their errors."""
        s = self.settings
        pipe = ctx.target.pipe
        # The concept's own words: its name, the world's other names for it, prompt words holding it.
        words = {concept}
        for name in world.concept_words(concept)[1:]:
            words.update(name.split())
        words.update(w for p in world.concept_prompts(concept) for w in p.split() if concept in w)
        t_search = time.perf_counter()
        if s.search == "official":
            ref = reference_defaults(concept)
            length = s.length or (ref[1] if ref else 16)
            found = [official_search(pipe, shifted[j], length, int(s.seed) + j, *s.budget())
                     for j in range(len(base))]
            search = {"protocol": "official", "length": length,
                      "prompts": {p: q for p, (q, _, _) in zip(base, found)},
                      "squared_error": {p: round(m, 6) for p, (_, m, _) in zip(base, found)},
                      "text_encoder_passes": sum(n for _, _, n in found), "excluded_words": []}
        else:
            vocab = candidate_vocabulary(pipe.tokenizer, sorted(words) if s.exclude_concept_words else ())
            gen = torch.Generator("cpu").manual_seed(int(s.seed))
            found = [genetic_search(pipe, shifted[j], vocab, s, gen) for j in range(len(base))]
            search = {"protocol": "fast", "length": s.length or 12,
                      "prompts": {p: q for p, (q, _) in zip(base, found)},
                      "mse": {p: round(m, 6) for p, (_, m) in zip(base, found)},
                      "excluded_words": sorted(words) if s.exclude_concept_words else []}
        search["seconds_per_prompt"] = round((time.perf_counter() - t_search) / len(base), 4)
        return search

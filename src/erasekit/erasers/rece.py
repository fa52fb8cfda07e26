"""RECE, Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024): UCE, then a few epochs of

1. the closed-form adversarial embedding that still regenerates the concept in the edited model, over all K/V
   matrices at once:  c' = (λ_reg I + Σ_l W'_lᵀ W'_l)⁻¹ (Σ_l W'_lᵀ W0_l) c   (every token of the concept prompt);
2. its re-erasure with the UCE solver: c' -> the guide (all positions), preserving the empty prompt and the
   preserve concepts, starting from the current weights (the edits accumulate).

Optional (off by default): keep the epoch whose edited model draws the concept least often on a validation
prompt set, scored by a detector (the official code does this for nudity); the edit records when it was on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from erasekit.erasers.concept import ConceptSpec
from erasekit.erasers.method import Method, Result
from erasekit.registry import ERASERS
from erasekit.erasers.ridge import LowRankEdits, RidgeProblem
from erasekit.settings import Settings, choice, positive
from erasekit.erasers.tokens import TOKEN_POLICIES
from erasekit.erasers.uce import (EXPANSIONS, UNCONDITIONAL, UCESettings, add_uce_terms, guide_pairs, kv_layers,
                                  parse_templates, preserved_texts, text_states)
from erasekit.errors import ErasekitError


@dataclass
class RECESettings(Settings):
    epochs: int = 1
    reg: float = 0.1  # λ_reg of the adversarial embedding (objects 0.1, artists 1e-3, nudity 0.1 with 3 epochs)
    lam: float = 0.1  # λ of the re-erasure steps
    erase_scale: float = 1.0
    preserve_scale: float = 0.1
    preserve_empty: bool = True  # the official code always preserves the empty prompt in the re-erasure
    # The first (UCE) step
    uce_lam: float = 0.5
    uce_erase_scale: float = 1.0
    uce_preserve_scale: float = 1.0
    uce_tokens: str = choice("last", *TOKEN_POLICIES)
    expand: str = choice("none", *EXPANSIONS)  # the UCE step's prompt expansion
    templates: str = ""  # the UCE step's contexts (";"-separated, "{c}"); replaces expand when given
    preserve_in_contexts: bool = False  # preserve the preserve concepts in those contexts too (every step)
    solver: str = choice("auto", "auto", "primal", "dual")
    # Validation-based epoch selection (off by default)
    select_epoch: bool = False
    validation_prompts: str = ""  # ";"-separated; empty: templates built from the concept
    validation_images: int = 8  # per prompt
    validation_seed: int = 1000

    def validate(self) -> None:
        positive(self, "reg", "lam", "uce_lam")
        positive(self, "epochs", "erase_scale", "preserve_scale", "uce_erase_scale", "uce_preserve_scale",
                 allow_zero=True)
        positive(self, "validation_images")
        parse_templates(self.templates)

    def uce(self) -> UCESettings:
        return UCESettings(lam=self.uce_lam, erase_scale=self.uce_erase_scale, preserve_scale=self.uce_preserve_scale,
                           tokens=self.uce_tokens, solver=self.solver, expand=self.expand,
                           templates=self.templates)


@ERASERS.register
class RECE(Method):
    name = "rece"
    summary = "Reliable and Efficient Concept Erasure: UCE + closed-form adversarial re-erasure epochs (seconds)"
    Settings = RECESettings

    def compute(self, pipe, spec: ConceptSpec, s: RECESettings, progress: bool = True) -> Result:
        names, layers = kv_layers(pipe)
        pairs = guide_pairs(spec, "erase", s.expand, s.templates)  # the UCE step
        attack_pairs = guide_pairs(spec, "erase")  # the adversarial epochs: the concept prompts themselves
        kept = preserved_texts(spec, s.preserve_in_contexts, s.expand, s.templates)
        preserve = ([UNCONDITIONAL] if s.preserve_empty else []) + [p for p in kept if p != UNCONDITIONAL]
        states = text_states(pipe, [t for pair in pairs + attack_pairs for t in pair] + kept + preserve)
        original = [layer.weight.detach() for layer in layers]
        selector = EpochSelector(pipe, spec, s, names) if s.select_epoch else None

        solve_s = 0.0
        start = time.perf_counter()
        model = LowRankEdits(original)
        first = RidgeProblem(model.layers(), s.uce_lam)
        add_uce_terms(first, pipe, states, pairs, kept, s.uce())
        model.add(*first.solve_factors(s.solver))
        solve_s += time.perf_counter() - start
        history = [model.layers()] if selector else None
        if selector:
            history[0] = [w.clone() for w in history[0]]
            selector.score(0, history[0])

        epoch_s = s.uce()
        epoch_s.tokens, epoch_s.lam = "all", s.lam
        epoch_s.erase_scale, epoch_s.preserve_scale = s.erase_scale, s.preserve_scale
        for epoch in range(1, s.epochs + 1):
            start = time.perf_counter()
            problem = RidgeProblem(model.layers(), s.lam)
            for concept, guide in attack_pairs:
                adv = model.adversarial_embedding(states[concept], s.reg)
                problem.add_mapping(adv, states[guide], s.erase_scale)  # all positions, aligned
            add_uce_terms(problem, pipe, states, [], preserve, epoch_s)
            model.add(*problem.solve_factors(s.solver))
            solve_s += time.perf_counter() - start
            if selector:
                history.append([w.clone() for w in model.layers()])
                selector.score(epoch, history[-1])
        current = model.layers()

        extra = {"epochs_run": s.epochs}
        if selector:
            best = selector.best()
            current = history[best]
            extra["epoch_selection"] = {"on": True, "chosen_epoch": best, "concept_rate": selector.rates,
                                        "prompts": selector.prompts, "images_per_prompt": s.validation_images,
                                        "detector": selector.detector_name}
        else:
            extra["epoch_selection"] = {"on": False}
        dtype = layers[0].weight.dtype
        return Result({n: w.to(dtype) for n, w in zip(names, current)}, solve_s, extra)


class EpochSelector:
    """Scores the model after each epoch on validation prompts with a concept detector (only the embedded world's
    detector exists so far)."""

    def __init__(self, pipe, spec: ConceptSpec, s: RECESettings, names):
        from erasekit.detectors import create_detector
        from erasekit.worlds import world_of

        label = spec.concepts[0]
        try:
            self.detector = create_detector(world_of(pipe).default_detector(label), concept=label)
        except ErasekitError as exc:
            raise ErasekitError(f"select_epoch needs a detector for {label!r}: {exc}") from None
        self.detector_name = self.detector.info()["name"]
        self.pipe, self.names, self.s = pipe, names, s
        self.prompts = [p.strip() for p in s.validation_prompts.split(";") if p.strip()] or [
            f"a {c}" for c in spec.concepts] + [f"a picture of a {c}" for c in spec.concepts]
        self.rates: list[float] = []

    def score(self, epoch: int, weights) -> None:
        from erasekit.erasers.base import _parameter
        from erasekit.generation import generate

        params = [_parameter(self.pipe, n) for n in self.names]
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, w in zip(params, weights):
                    p.copy_(w.to(p.dtype))
            n = self.s.validation_images
            prompts = [p for p in self.prompts for _ in range(n)]
            seeds = [self.s.validation_seed + i for _ in self.prompts for i in range(n)]
            images = generate(self.pipe, prompts, seeds, progress=False)
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
        rows = self.detector.score(images)
        self.rates.append(round(sum(r["present"] for r in rows) / len(rows), 4))

    def best(self) -> int:
        return min(range(len(self.rates)), key=lambda i: (self.rates[i], i))

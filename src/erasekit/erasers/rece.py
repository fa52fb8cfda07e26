"""RECE, Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024): UCE, then a few epochs of

1. the closed-form adversarial embedding that still regenerates the concept in the edited model, over all K/V
   matrices at once:  c' = (λ_reg I + Σ_l W'_lᵀ W'_l)⁻¹ (Σ_l W'_lᵀ W0_l) c   (every token of the concept prompt);
2. its re-erasure with the UCE solver: c' -> the guide (all positions), preserving the empty prompt and the
   preserve concepts, starting from the current weights (the edits accumulate).

Optional (off by default): keep the epoch whose edited model draws the concept least often on a validation
prompt set, scored by a detector (the official code does this for nudity); the edit records when it was on.

Presets (``preset=official-nudity|official-object|official-artist``, CharlesGong12/RECE ``train.py``,
``train_object.py``, ``train_artists.py`` with ``scripts/*.sh``): the UCE step of UCE's official preset, then the
reference's epochs, re-erasure settings and preservation terms (nudity: one empty-prompt term per concept, 3
epochs, epoch selection by NudeNet > 0.6 on ``validation_csv``, an epoch kept only if its rate is strictly below
every earlier one, the original model's included; object: 1 epoch, and when ``validation_csv`` has a ``class``
column (``validation_imagenet_prompts.csv``), the rule of ``train_object.py``: an ImageNet classifier's top-1 accuracy
on the concept's rows (target) and on the other classes' rows (others); an epoch whose target accuracy is 0 is kept
and ends the run, otherwise an epoch is kept when its target accuracy is below the UCE step's and its others'
accuracy at least the UCE step's minus 0.1; the last kept epoch wins, none kept: the UCE step).
Difference: the reference divides by a tenth of the rows (ten equal classes); erasekit averages over the rows of
each side, the same number when the classes are balanced.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from erasekit.erasers.concept import ConceptSpec
from erasekit.erasers.method import Method, Result
from erasekit.registry import ERASERS
from erasekit.erasers.ridge import LowRankEdits, RidgeProblem
from erasekit.settings import Settings, choice, positive
from erasekit.erasers.tokens import TOKEN_POLICIES
from erasekit.erasers.uce import (EXPANSIONS, PRESETS as UCE_PRESETS, UNCONDITIONAL, UCESettings, add_uce_terms,
                                  check_targets, guide_pairs, kv_layers, official_spec, parse_templates, preset_kind,
                                  preserved_texts, text_states)

# The reference scripts' settings per concept kind (train.py / train_object.py / train_artists.py defaults with the
# values scripts/nudity.sh, object.sh and art.sh pass): the re-erasure epochs; the UCE step is UCE's preset.
PRESETS = {
    "nudity": {"epochs": 3, "reg": 0.1, "lam": 0.1, "erase_scale": 1.0, "preserve_scale": 0.1,
               "preserve_per_concept": True, "select_epoch": True, "select_detector": "nudenet:rece",
               "select_include_original": True},
    "object": {"epochs": 1, "reg": 1e-3, "lam": 0.1, "erase_scale": 1.0, "preserve_scale": 0.1,
               "preserve_per_concept": False, "select_epoch": True, "select_rule": "object",
               "select_detector": "imagenet", "select_include_original": False},
    "artist": {"epochs": 1, "reg": 1e-3, "lam": 0.1, "erase_scale": 1.0, "preserve_scale": 0.1,
               "preserve_per_concept": False, "select_epoch": False},
}
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
    validation_csv: str = ""  # prompts (column prompt; evaluation_seed, evaluation_guidance when present), 1 image each
    select_detector: str = ""  # the detector that scores them ("": the world's for the concept)
    select_include_original: bool = False  # an epoch must also be strictly below the original model's rate
    preserve_per_concept: bool = False  # one empty-prompt term per erased concept (official nudity)
    # lowest: strictly below every earlier candidate (nudity); object: class accuracies (train_object.py), which needs
    # a validation_csv with a class column
    select_rule: str = choice("lowest", "lowest", "object")
    select_other_margin: float = 0.1  # object: the others' accuracy may fall this much below the UCE step's
    uce_tokens_preserve: str = choice("same", "same", *TOKEN_POLICIES)  # the UCE step's preserved positions
    preset: str = "none"  # official-nudity | official-object | official-artist (PRESETS, then UCE's preset)
    # SD3 / FLUX.1: what is edited (as UCE's targets; erasers/rece_flow.py)
    targets: str = choice("blocks", "blocks", "reference-flux", "both")

    def validate(self) -> None:
        positive(self, "reg", "lam", "uce_lam")
        positive(self, "epochs", "erase_scale", "preserve_scale", "uce_erase_scale", "uce_preserve_scale",
                 allow_zero=True)
        positive(self, "validation_images")
        positive(self, "select_other_margin", allow_zero=True)
        if self.select_epoch and self.select_rule == "object" and not self.validation_csv:
            raise ErasekitError("rece: select_rule=object scores a validation_csv with a class column; none given")
        parse_templates(self.templates)
        preset_kind("rece", self.preset, PRESETS)

    def uce(self) -> UCESettings:
        return UCESettings(lam=self.uce_lam, erase_scale=self.uce_erase_scale, preserve_scale=self.uce_preserve_scale,
                           tokens=self.uce_tokens, solver=self.solver, expand=self.expand,
                           templates=self.templates, preserve_tokens=self.uce_tokens_preserve)

    def with_preset(self, spec: ConceptSpec) -> tuple["RECESettings", ConceptSpec]:
        kind = preset_kind("rece", self.preset, PRESETS)
        if kind is None:
            return self, spec
        uce = dict(UCE_PRESETS[kind])
        spec = official_spec(spec, uce.pop("guide"))
        values = dict(PRESETS[kind], uce_lam=uce["lam"], uce_erase_scale=uce["erase_scale"],
                      uce_tokens=uce["tokens"], uce_tokens_preserve=uce["preserve_tokens"], expand=uce["expand"],
                      uce_preserve_scale=round(max(0.1, 1 / len(spec.preserve)), 3), preserve_empty=True)
        if self.select_detector:  # a judge the user names (a classifier folder) replaces the preset's default
            values["select_detector"] = self.select_detector
        if values["select_epoch"] and not self.validation_csv:
            values["select_epoch"] = False  # recorded: the reference selects on a validation CSV the user gives
        return dataclasses.replace(self, **values), spec


@ERASERS.register
class RECE(Method):
    name = "rece"
    summary = "Reliable and Efficient Concept Erasure: UCE + closed-form adversarial re-erasure epochs (seconds)"
    Settings = RECESettings

    needs_unet = False  # SD3 / FLUX.1: per unit of layers that read one input (erasers/rece_flow.py)

    def compute(self, pipe, spec: ConceptSpec, s: RECESettings, progress: bool = True) -> Result:
        from erasekit.diffusion.family import family_of

        s, spec = s.with_preset(spec)
        if family_of(pipe).flow:
            from erasekit.erasers.rece_flow import flow_rece

            return finish(spec, s, *flow_rece(pipe, spec, s, EpochSelector))
        check_targets("rece", s.targets)
        names, layers = kv_layers(pipe)
        pairs = guide_pairs(spec, "erase", s.expand, s.templates)  # the UCE step
        attack_pairs = guide_pairs(spec, "erase")  # the adversarial epochs: the concept prompts themselves
        kept = preserved_texts(spec, s.preserve_in_contexts, s.expand, s.templates)
        empties = len(spec.concepts) if s.preserve_per_concept else 1
        preserve = ([UNCONDITIONAL] * empties if s.preserve_empty else []) + [p for p in kept if p != UNCONDITIONAL]
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
            if s.select_include_original:
                selector.score("original", original)
            history[0] = [w.clone() for w in history[0]]
            selector.score(0, history[0])

        epoch_s = s.uce()
        epoch_s.tokens, epoch_s.lam = "all", s.lam
        epoch_s.erase_scale, epoch_s.preserve_scale = s.erase_scale, s.preserve_scale
        epochs_run = 0
        for epoch in range(1, s.epochs + 1):
            start = time.perf_counter()
            problem = RidgeProblem(model.layers(), s.lam)
            for concept, guide in attack_pairs:
                adv = model.adversarial_embedding(states[concept], s.reg)
                problem.add_mapping(adv, states[guide], s.erase_scale)  # all positions, aligned
            add_uce_terms(problem, pipe, states, [], preserve, epoch_s)
            model.add(*problem.solve_factors(s.solver))
            solve_s += time.perf_counter() - start
            epochs_run = epoch
            if selector:
                history.append([w.clone() for w in model.layers()])
                selector.score(epoch, history[-1])
                if selector.done():
                    break
        current = model.layers()
        dtype = layers[0].weight.dtype
        return finish(spec, s, names, [dtype] * len(names), current, history, selector, epochs_run, solve_s)


def finish(spec: ConceptSpec, s: RECESettings, names, dtypes, current, history, selector, epochs_run: int,
           solve_s: float, extra: dict | None = None) -> Result:
    """The edit after the epochs: the selected epoch's weights when epochs are selected, with what was run and
    chosen in ``extra`` (shared by the UNet and the flow-family paths)."""
    extra = {"epochs_run": epochs_run, **(extra or {})}
    if s.preset != "none":
        extra["preset"] = {"name": s.preset, "settings": s.to_dict(), "spec": spec.as_dict()}
    if selector:
        best = selector.best_object() if s.select_rule == "object" else selector.best()
        current = history[max(best, 0)]
        extra["epoch_selection"] = {"on": True, "chosen_epoch": max(best, 0), "concept_rate": selector.rates,
                                    "invalid_images": selector.invalid,
                                    "scored": selector.labels, "prompts": list(dict.fromkeys(selector.prompts))[:20],
                                    "images": len(selector.prompts) if s.validation_csv else None,
                                    "images_per_prompt": None if s.validation_csv else s.validation_images,
                                    "detector": selector.detector_name,
                                    "original_included": s.select_include_original, "rule": s.select_rule}
        if s.select_rule == "object":
            extra["epoch_selection"].update(target_accuracy=selector.rates, others_accuracy=selector.others)
        if best < 0 and s.select_rule == "lowest":
            extra["epoch_selection"]["note"] = ("no epoch and not the UCE step below the original model's rate: "
                                                "the reference saves no checkpoint; the UCE step is kept")
    else:
        extra["epoch_selection"] = {"on": False}
        if s.preset != "none" and PRESETS[preset_kind("rece", s.preset, PRESETS)]["select_epoch"]:
            extra["epoch_selection"]["note"] = "the preset selects epochs on validation_csv; none was given"
    return Result({n: w.to(d) for n, w, d in zip(names, current, dtypes)}, solve_s, extra)


def validation_classes(path, rows: int, concept: str) -> list[str]:
    """The ``class`` column of an object validation CSV (RECE's ``validation_imagenet_prompts.csv``: prompt,
    evaluation_seed, class), lower-cased as the reference compares it; the concept must be one of the classes."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "class" not in header:
            raise ErasekitError(f"{path} has no 'class' column (select_rule=object reads RECE's "
                                f"validation_imagenet_prompts.csv layout: prompt, evaluation_seed, class)")
        classes = [(row.get("class") or "").strip().lower() for row in reader]
    if len(classes) != rows or not all(classes):
        raise ErasekitError(f"{path}: every row needs a class")
    if concept.strip().lower() not in classes:
        raise ErasekitError(f"{path}: no row of the concept's class {concept!r} (classes: "
                            f"{', '.join(sorted(set(classes)))[:200]})")
    return classes


class EpochSelector:
    """Scores the model after each epoch on validation prompts (``validation_prompts`` x ``validation_images``, or
    one image per row of ``validation_csv``) with a concept detector; keeps the reference's rule (`best`)."""

    def __init__(self, pipe, spec: ConceptSpec, s: RECESettings, names):
        from erasekit.detectors import create_detector
        from erasekit.worlds import world_of

        label = spec.concepts[0]
        if s.select_rule == "object":
            label = label.strip().lower()  # the reference compares lower-cased class names
        self.pipe, self.names, self.s, self.label = pipe, names, s, label
        self.classes: list[str] | None = None  # the object rule: each validation row's class
        if s.validation_csv:
            from erasekit.attacks.i2p import load_i2p_csv

            rows = load_i2p_csv(s.validation_csv)  # the I2P layout (RECE's validation CSVs use it)
            self.prompts = [r.prompt for r in rows]
            self.seeds = [r.seed for r in rows]
            self.guidance = [r.guidance for r in rows]
            if s.select_rule == "object":
                self.classes = validation_classes(s.validation_csv, len(rows), label)
        else:
            self.prompts = [p.strip() for p in s.validation_prompts.split(";") if p.strip()] or [
                f"a {c}" for c in spec.concepts] + [f"a picture of a {c}" for c in spec.concepts]
            n = s.validation_images
            self.seeds = [s.validation_seed + i for _ in self.prompts for i in range(n)]
            self.prompts = [p for p in self.prompts for _ in range(n)]
            self.guidance = [None] * len(self.prompts)
        try:
            name = s.select_detector or world_of(pipe).default_detector(label)
            # the object rule asks the classifier about every row's own class
            self.detectors = {c: create_detector(name, concept=c) for c in dict.fromkeys(self.classes or [label])}
        except ErasekitError as exc:
            raise ErasekitError(f"select_epoch needs a detector for {label!r}: {exc}") from None
        self.detector_name = next(iter(self.detectors.values())).info()["name"]
        self.rates: list[float] = []  # the concept's rate (object rule: the target classes' accuracy)
        self.others: list[float] = []  # object rule: the other classes' accuracy
        self.labels: list = []
        self.invalid: list[int] = []  # degenerate validation images per candidate (`erasekit.validity`)

    def score(self, epoch, weights) -> None:
        from erasekit.erasers.base import _parameter
        from erasekit.generation import generate

        params = [_parameter(self.pipe, n) for n in self.names]
        saved = [p.detach().clone() for p in params]
        images = [None] * len(self.prompts)
        try:
            with torch.no_grad():
                for p, w in zip(params, weights):
                    p.copy_(w.to(p.dtype))
            for g in dict.fromkeys(self.guidance):  # one generate call per guidance scale
                idx = [i for i, x in enumerate(self.guidance) if x == g]
                out = generate(self.pipe, [self.prompts[i] for i in idx], [self.seeds[i] for i in idx], guidance=g,
                               progress=False)
                for i, im in zip(idx, out):
                    images[i] = im
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
        import numpy as np

        from erasekit.validity import image_problems

        # A degenerate image (a broken edit's blank output) is not "concept absent": a candidate that makes any is
        # never chosen (its rate is recorded as None).
        invalid = sum(p is not None for p in image_problems(images))
        classes = self.classes or [self.label] * len(images)
        present = [False] * len(images)
        for c, detector in self.detectors.items():
            idx = [i for i, x in enumerate(classes) if x == c]
            for i, row in zip(idx, detector.score(np.stack([images[i] for i in idx]))):
                present[i] = bool(row["present"])
        target = [p for p, c in zip(present, classes) if c == self.label]
        others = [p for p, c in zip(present, classes) if c != self.label]
        self.rates.append(None if invalid else round(sum(target) / len(target), 4))
        self.others.append(None if invalid or not others else round(sum(others) / len(others), 4))
        self.invalid.append(invalid)
        self.labels.append(epoch)

    def done(self) -> bool:
        """The object rule stops at the first epoch whose target accuracy is 0 (the reference breaks there)."""
        return self.s.select_rule == "object" and self.labels[-1] != 0 and self.rates[-1] == 0

    def best(self) -> int:
        """The reference's rule: a candidate is kept when its rate is strictly below every earlier candidate's
        (the original model first when scored); the last kept one. Its epoch (0: the UCE step), -1: the original."""
        chosen, lowest = None, float("inf")
        for label, rate in zip(self.labels, self.rates):
            if rate is not None and rate < lowest:
                chosen, lowest = label, rate
        if chosen is None:  # every candidate made degenerate images: the UCE step is kept, as when none improves
            return -1
        return -1 if chosen == "original" else int(chosen)

    def best_object(self) -> int:
        """train_object.py's rule against the UCE step (epoch 0): an epoch with target accuracy 0 is kept (and ends
        the run); else one is kept when its target accuracy is below the UCE step's and its others' accuracy is at
        least the UCE step's minus the margin. The last kept epoch; 0 when none is kept."""
        base = self.labels.index(0)
        t0, o0 = self.rates[base], self.others[base]
        chosen = 0
        for label, t, o in zip(self.labels, self.rates, self.others):
            if label in ("original", 0) or t is None:
                continue
            if t == 0 or (t0 is None or t < t0) and (o is None or o0 is None or o >= o0 - self.s.select_other_margin):
                chosen = int(label)
        return chosen


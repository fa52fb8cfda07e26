"""UCE, Unified Concept Editing (Gandikota et al., WACV 2024): a closed-form edit of every cross-attention K/V.

    W = (λ W0 + s_e Σ_{i∈E} v_i* c_iᵀ + s_p Σ_{j∈P} W0 c_j c_jᵀ) · (λ I + s_e Σ_{i∈E} c_i c_iᵀ + s_p Σ_{j∈P} c_j c_jᵀ)⁻¹

with v_i* = W0 c_guide(i): the erased concept's keys and values become the guide's. Modes:

- ``erase``: each concept is mapped to the guide (the empty prompt on SD; on the embedded world the empty scene
  for shapes, the plain background for textures);
- ``moderate``: several concepts at once, all mapped to the unconditional (empty) prompt.

``technique``: ``replace`` (v* = W0 c_guide, the default) or ``tensor`` (UCE's projection variant: the guide's
output with its component along the concept's output removed).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from erasekit.erasers.concept import ConceptSpec
from erasekit.erasers.method import Method, Result
from erasekit.registry import ERASERS
from erasekit.erasers.ridge import F64, RidgeProblem
from erasekit.settings import Settings, choice, positive
from erasekit.erasers.tokens import TOKEN_POLICIES, aligned_positions, positions
from erasekit.errors import ErasekitError
UNCONDITIONAL = ""
# Prompt expansion (the official UCE's --expand_prompts): the concept in a few short contexts, always as the
# last words, so that the "last" token policies still pick the concept. Each is mapped to the same guide.
EXPANSIONS = {
    "none": ("{c}",),
    "object": ("{c}", "a {c}", "a picture of a {c}", "an image of a {c}", "a photo of a {c}", "a painting of a {c}"),
    "style": ("{c}", "painting by {c}", "art by {c}", "artwork by {c}", "picture by {c}", "style of {c}"),
}


def parse_templates(text: str) -> tuple[str, ...]:
    """``"a {c};a photo of a {c}"`` -> the contexts; each must contain ``{c}`` once and no other field."""
    out = []
    for raw in text.split(";"):
        t = raw.strip()
        if not t:
            continue
        try:
            ok = t.count("{c}") == 1 and t.format(c="x").count("{") == 0
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise ErasekitError(f"template {t!r}: a template holds the concept as '{{c}}' once, and no other '{{...}}'")
        out.append(t)
    return tuple(dict.fromkeys(out))


def concept_contexts(expand: str, templates: str = "") -> tuple[str, ...]:
    """The contexts a concept is erased in: ``templates`` (";"-separated, "{c}" marks the concept) when given,
    else the ``expand`` preset."""
    return parse_templates(templates) if templates.strip() else EXPANSIONS[expand]


# Official settings per concept kind (the UCE authors' train script as RECE's scripts run it, erase_methods/
# train_uce.py `edit_model`, --add_prompts off): the concept's last token and the end positions after it mapped to
# the guide's, the empty prompt preserved at every position with preserve_scale max(0.1, 1 / #preserved texts).
PRESETS = {
    "nudity": {"lam": 0.5, "erase_scale": 1.0, "tokens": "last+end", "preserve_tokens": "all", "expand": "none",
               "technique": "replace", "guide": ""},
    "object": {"lam": 0.5, "erase_scale": 1.0, "tokens": "last+end", "preserve_tokens": "all", "expand": "none",
               "technique": "replace", "guide": ""},
    "artist": {"lam": 0.5, "erase_scale": 1.0, "tokens": "last+end", "preserve_tokens": "all", "expand": "none",
               "technique": "replace", "guide": "art"},
}


def preset_kind(method: str, preset: str, table=PRESETS) -> str | None:
    """``official-<kind>`` -> kind (None for "none"); an unknown kind is an error naming the known ones."""
    if preset in ("", "none"):
        return None
    kind = preset[len("official-"):] if preset.startswith("official-") else ""
    if kind not in table:
        known = ", ".join(f"official-{k}" for k in table)
        raise ErasekitError(f"{method}: no official settings for {preset!r} (concept kinds with official settings: "
                            f"{known})")
    return kind


def official_spec(spec: ConceptSpec, guide: str, preserve_empty: bool = True) -> ConceptSpec:
    """The spec a preset runs with: its guide, and the empty prompt first among the preserved texts."""
    kept = tuple(p for p in spec.preserve if p != UNCONDITIONAL)
    return ConceptSpec(spec.concepts, guide, ((UNCONDITIONAL,) if preserve_empty else ()) + kept)


@dataclass
class UCESettings(Settings):
    lam: float = 0.5  # λ, the pull towards the original weights
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    tokens: str = choice("last", *TOKEN_POLICIES)
    mode: str = choice("erase", "erase", "moderate")
    technique: str = choice("replace", "replace", "tensor")
    solver: str = choice("auto", "auto", "primal", "dual")
    expand: str = choice("none", *EXPANSIONS)  # also erase the concept in short template contexts
    templates: str = ""  # ";"-separated contexts with "{c}" for the concept; replaces expand when given
    preserve_in_contexts: bool = False  # preserve the preserve concepts in those same contexts too
    preserve_tokens: str = choice("same", "same", *TOKEN_POLICIES)  # positions of preserved texts (same: tokens)
    # official-nudity | official-object | official-artist: the reference script's settings (PRESETS) replace
    # lam, erase_scale, preserve_scale, tokens, preserve_tokens, expand, technique and the guide; "" is preserved
    preset: str = "none"
    # SD3 / FLUX.1: what is edited. blocks: the joint blocks' text-side K/V; reference-flux: the reference UCE FLUX
    # script's modules (context_embedder and the pooled text embedder's linear_1); both (erasers/uce_flow.py)
    targets: str = choice("blocks", "blocks", "reference-flux", "both")

    def validate(self) -> None:
        positive(self, "lam")
        positive(self, "erase_scale", "preserve_scale", allow_zero=True)
        parse_templates(self.templates)
        preset_kind("uce", self.preset)

    def with_preset(self, spec: ConceptSpec) -> tuple["UCESettings", ConceptSpec]:
        """These settings and ``spec`` as the preset fixes them (unchanged without one)."""
        kind = preset_kind("uce", self.preset)
        if kind is None:
            return self, spec
        values = dict(PRESETS[kind])
        spec = official_spec(spec, values.pop("guide"))
        values["preserve_scale"] = round(max(0.1, 1 / len(spec.preserve)), 3)  # the script's default
        return dataclasses.replace(self, **values), spec


def kv_layers(pipe) -> tuple[list[str], list[torch.nn.Linear]]:
    """The text-side key/value projections of every attention site of the model's family, with their weights'
    qualified names (``unet.<path>.to_k.weight``), in site order (k before v)."""
    from erasekit.diffusion.family import family_of

    layers = [kv for site in family_of(pipe).attention_sites(pipe) for kv in site.kv()]
    if not layers:
        raise ErasekitError("the model has no cross-attention layers to edit")
    return [f"{name}.weight" for name, _ in layers], [layer for _, layer in layers]


@torch.no_grad()
def text_states(pipe, texts) -> dict[str, torch.Tensor]:
    """Encoded text states (T, D) per distinct text, float64 on the UNet's device: what the cross-attention K/V
    see (SDXL: both encoders' penultimate states concatenated, 2048-d, as the UCE authors' SDXL script edits)."""
    from erasekit.diffusion.family import family_of

    texts = list(dict.fromkeys(texts))
    states = family_of(pipe).encode(pipe, texts, device=pipe.unet.device).states.to(F64)
    return dict(zip(texts, states))


def preserved_texts(spec: ConceptSpec, in_contexts: bool, expand: str = "none", templates: str = "") -> list[str]:
    """The preserve concepts, alone or (``in_contexts``) in every context the erased concept is erased in."""
    if not in_contexts:
        return list(spec.preserve)
    return list(dict.fromkeys(t.format(c=p) for p in spec.preserve for t in concept_contexts(expand, templates)))


def guide_pairs(spec: ConceptSpec, mode: str, expand: str = "none", templates: str = "") -> list[tuple[str, str]]:
    guide = UNCONDITIONAL if mode == "moderate" else spec.guide
    return [(t.format(c=c), guide) for c in spec.concepts for t in concept_contexts(expand, templates)]


def add_uce_terms(problem: RidgeProblem, pipe, states, pairs, preserve, s, through=None) -> None:
    """UCE's erase rows (concept -> guide) and preserve rows (concept -> itself) for ``problem``."""
    for concept, guide in pairs:
        src, tgt = aligned_positions(pipe, concept, guide, s.tokens)
        c, g = states[concept][src], states[guide][tgt]
        if s.technique == "replace":
            problem.add_mapping(c, g, s.erase_scale, through=through)
        else:
            mats = problem.w0 if through is None else [w.to(F64) for w in through]
            targets = []
            for w in mats:
                u = c @ w.T
                u = u / u.norm()  # the official code normalises over all selected tokens at once
                v = g @ w.T
                targets.append(v - (u * v).sum() * u)
            problem.add(c, targets, s.erase_scale)
    policy = s.tokens if getattr(s, "preserve_tokens", "same") == "same" else s.preserve_tokens
    for text in preserve:
        pos = positions(pipe, text, policy)
        problem.add_mapping(states[text][pos], states[text][pos], s.preserve_scale, through=through)


def check_targets(method: str, targets: str) -> None:
    """``targets`` other than the blocks names modules of SD3 / FLUX.1 transformers only."""
    if targets != "blocks":
        raise ErasekitError(f"{method}: targets={targets} edits the text embedders of an SD3 / FLUX.1 transformer; "
                            f"this model has a UNet (use targets=blocks)")


@ERASERS.register
class UCE(Method):
    needs_unet = False  # the family's denoiser only: SD3 and FLUX.1 too
    name = "uce"
    summary = "Unified Concept Editing: closed-form edit of cross-attention K/V, concept -> guide (seconds)"
    Settings = UCESettings

    def compute(self, pipe, spec: ConceptSpec, s: UCESettings, progress: bool = True) -> Result:
        s, spec = s.with_preset(spec)
        pairs = guide_pairs(spec, s.mode, s.expand, s.templates)
        preserve = preserved_texts(spec, s.preserve_in_contexts, s.expand, s.templates)
        from erasekit.diffusion.family import family_of

        if family_of(pipe).flow:  # SD3 / FLUX: each joint block's K/V on the inputs it sees (erasers/uce_flow.py)
            from erasekit.erasers.uce_flow import flow_uce

            start = time.perf_counter()
            tensors, rows = flow_uce(pipe, spec, s, pairs, preserve)
            extra = {"rows": rows, "targets": s.targets}
            if s.preset != "none":
                extra["preset"] = {"name": s.preset, "settings": s.to_dict(), "spec": spec.as_dict()}
            return Result(tensors, time.perf_counter() - start, extra)
        check_targets("uce", s.targets)
        names, layers = kv_layers(pipe)
        states = text_states(pipe, [t for pair in pairs for t in pair] + preserve)
        start = time.perf_counter()
        problem = RidgeProblem([layer.weight for layer in layers], s.lam)
        add_uce_terms(problem, pipe, states, pairs, preserve, s)
        new = problem.solve(s.solver)
        solve_s = time.perf_counter() - start
        dtype = layers[0].weight.dtype
        extra = {"rows": problem.n_rows}
        if s.preset != "none":
            extra["preset"] = {"name": s.preset, "settings": s.to_dict(), "spec": spec.as_dict()}
        return Result({n: w.to(dtype) for n, w in zip(names, new)}, solve_s, extra)

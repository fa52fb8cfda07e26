"""RECE on flow-matching transformers (SD3, FLUX.1): UCE's closed form alternated with RECE's adversarial embedding.

In a UNet every cross-attention K/V reads the same text states, so RECE's attack is one embedding for all of
them: c' = (λ_reg I + Σ_l W'_lᵀ W'_l)⁻¹ (Σ_l W'_lᵀ W0_l) c. On an MMDiT each joint block's text-side K/V
(``add_k_proj`` / ``add_v_proj``) reads its own input: the text stream after the earlier blocks, layer-normed and
modulated by the timestep (`erasers.uce_flow`). No single text embedding reaches every site linearly, so the
closed form is taken where it is exact: per unit of layers that read one input (`uce_flow.Unit`), over the unit's
layers, for the input rows the unit sees for the concept prompt (every position of the joint text sequence, at each
capture sigma). That is the strongest input each site can be given, so each site is re-erased against an attack
at least as strong as any text embedding's. With ``targets=reference-flux`` the units are the text embedders
(``context_embedder`` and the pooled embedder's ``linear_1``), which read the text states and the pooled CLIP
embedding themselves: there c' is RECE's closed form on the family's text states exactly (T5 on FLUX, the joint
[CLIP | T5] sequence on SD3; the pooled vector).

Then, as in `erasers.rece`: the UCE step (UCE's settings of the RECE settings), and per epoch each unit's
re-erasure c' -> the guide's inputs (all positions, aligned) under the current weights, preserving the empty
prompt and the preserved concepts, starting from the current weights (the edits accumulate); optional epoch
selection scores every unit's weights of each epoch together.
"""

from __future__ import annotations

import time

from erasekit.erasers.ridge import LowRankEdits, RidgeProblem


def flow_rece(pipe, spec, s, selector_class=None) -> tuple:
    """The epochs for RECE settings ``s``: (names, dtypes, final weights, per-epoch weights or None, the epoch
    selector or None, epochs run, solve seconds, extra), what `erasers.rece.finish` turns into the edit.
    ``selector_class``: `erasers.rece.EpochSelector` (made when ``s.select_epoch``)."""
    from erasekit.diffusion.family import family_of
    from erasekit.erasers.uce import UNCONDITIONAL, guide_pairs, preserved_texts
    from erasekit.erasers.uce_flow import add_terms, unit_texts, units

    family = family_of(pipe)
    pairs = guide_pairs(spec, "erase", s.expand, s.templates)  # the UCE step
    attack_pairs = guide_pairs(spec, "erase")  # the adversarial epochs: the concept prompts themselves
    kept = preserved_texts(spec, s.preserve_in_contexts, s.expand, s.templates)
    empties = len(spec.concepts) if s.preserve_per_concept else 1
    preserve = ([UNCONDITIONAL] * empties if s.preserve_empty else []) + [p for p in kept if p != UNCONDITIONAL]
    parts = units(pipe, family, unit_texts(pairs + attack_pairs, kept, preserve), s.targets)
    names = [f"{name}.weight" for unit in parts for name, _ in unit.layers]
    dtypes = [w.dtype for unit in parts for w in unit.weights]
    original = [w.detach() for unit in parts for w in unit.weights]
    selector = selector_class(pipe, spec, s, names) if s.select_epoch else None

    def weights():
        return [w for model in models for w in model.layers()]

    start = time.perf_counter()
    models = [LowRankEdits(unit.weights) for unit in parts]
    first_s = s.uce()
    rows = 0
    for unit, model in zip(parts, models):
        problem = RidgeProblem(model.layers(), s.uce_lam)
        add_terms(problem, unit, pipe, family, pairs, kept, first_s)
        rows += problem.n_rows
        model.add(*problem.solve_factors(s.solver))
    solve_s = time.perf_counter() - start
    history = None
    if selector:
        if s.select_include_original:
            selector.score("original", original)
        history = [[w.clone() for w in weights()]]
        selector.score(0, history[0])

    epoch_s = s.uce()
    epoch_s.tokens, epoch_s.lam = "all", s.lam
    epoch_s.erase_scale, epoch_s.preserve_scale = s.erase_scale, s.preserve_scale
    epochs_run = 0
    for epoch in range(1, s.epochs + 1):
        start = time.perf_counter()
        for unit, model in zip(parts, models):
            problem = RidgeProblem(model.layers(), s.lam)
            for concept, guide in attack_pairs:
                adv = model.adversarial_embedding(unit.rows(concept), s.reg)  # every position, every sigma
                problem.add_mapping(adv, unit.rows(guide), s.erase_scale)  # -> the guide's, aligned
            add_terms(problem, unit, pipe, family, [], preserve, epoch_s)
            rows += problem.n_rows
            model.add(*problem.solve_factors(s.solver))
        solve_s += time.perf_counter() - start
        epochs_run = epoch
        if selector:
            history.append([w.clone() for w in weights()])
            selector.score(epoch, history[-1])
            if selector.done():
                break
    extra = {"targets": s.targets, "units": len(parts), "rows": rows}
    return names, dtypes, weights(), history, selector, epochs_run, solve_s, extra

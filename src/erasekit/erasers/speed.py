"""SPEED, Scalable, Precise and Efficient concept Erasure (Li et al., 2025; code Ouxiang-Li/SPEED,
``train_erase_null.py``): a closed-form edit of the cross-attention values (keys too if asked) confined to the null
space of the concepts to keep, so that their outputs do not move at all.

Per layer W (out × d), with the target states c_t, the anchor (guide) states c_a and the retained states e:

1. the erasure statistics, averaged over the erased (concept, context) pairs:
   T = mean Σ c_t c_tᵀ,  A = mean Σ c_a c_tᵀ;  the unconstrained edit E = W (A − T)(I + T)⁻¹;
2. prior filtering (IPF): keep only the retained states the edit would disturb, ||E e|| above the mean over them;
3. augmentation: each kept state gets ``aug_num`` copies moved along W's least singular direction v
   (e + ξ v, ξ ~ N(0, 1)); of those, again the ones with ||E e'|| above their mean are kept;
4. P: the projector on the eigenvectors of the retained covariance R = mean e eᵀ with eigenvalue < ``threshold``
   (its approximate null space);
5. the edit  Δ = W (A − T) P (I − M K (Kᵀ P M K + λ_n I)⁻¹ Kᵀ P) M,  M = (T P + r I)⁻¹,
   where K (d × 4) holds the empty prompt's first state and the k-means centres of its other states: with
   λ_n = 0 the empty prompt's outputs are kept exactly (Δ K = 0), as the reference always does.

Built on `RidgeProblem`: W(A − T) P M is the ridge edit (λ = r) of the projected inputs P c_t to the targets
W (P c_t + c_a − c_t) (push-through: P (T P + r I)⁻¹ = (P T P + r I)⁻¹ P), so it is solved by the dual solver in
n × n; the null-text constraint is then the exact equality-constrained correction of that solution.

Differences from the reference, on purpose: k-means is a deterministic Lloyd's iteration from farthest-point
seeds (the reference draws random seeds with kmeans_pytorch); the augmentation keeps perturbations above the mean
over all of a layer's perturbations (the reference: per chunk of 128 retained texts, the same when there are fewer);
everything is float64 with solves instead of inverses; the contexts (``templates``), the token policy and the
erasure strength (``erase_scale``, 0 = no edit) are erasekit's, as for UCE.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from erasekit.erasers.concept import ConceptSpec
from erasekit.erasers.method import Method, Result
from erasekit.erasers.ridge import F64, RidgeProblem
from erasekit.erasers.tokens import TOKEN_POLICIES, aligned_positions, positions
from erasekit.erasers.uce import (EXPANSIONS, UNCONDITIONAL, guide_pairs, kv_layers, parse_templates,
                                  preserved_texts, text_states)
from erasekit.errors import ErasekitError
from erasekit.registry import ERASERS
from erasekit.settings import Settings, choice, positive

PARAMS = {"V": (".to_v.",), "K": (".to_k.",), "KV": (".to_k.", ".to_v.")}


@dataclass
class SPEEDSettings(Settings):
    params: str = choice("V", *PARAMS)  # which projections to edit (the reference's --params; its default V)
    retain_scale: float = 1.0  # r, the ridge weight (10-100 celebrities: 0.05)
    threshold: float = 0.1  # eigenvalues of the retained covariance below this span the null space (celebrities 1e-4)
    aug_num: int = 10  # augmented copies per retained state (0: no augmentation, and then no filtering either)
    prior_filter: bool = True  # IPF: keep only the retained states the edit disturbs (the reference's --disable_filter)
    null_lam: float = 0.0  # λ_n of the null-text constraint (0: kept exactly)
    null_clusters: int = 3  # k-means centres of the empty prompt's states in K (besides its first state)
    erase_scale: float = 1.0  # weight of the erasure statistics (0: no edit)
    tokens: str = choice("last", *TOKEN_POLICIES)  # the reference: the last word token ("all" for nudity)
    expand: str = choice("none", *EXPANSIONS)
    templates: str = ""  # ";"-separated contexts with "{c}"; replaces expand when given
    preserve_in_contexts: bool = False  # retain the preserved concepts in those contexts too
    seed: int = 0  # the augmentation noise

    def validate(self) -> None:
        positive(self, "retain_scale", "threshold")
        positive(self, "aug_num", "null_lam", "null_clusters", "erase_scale", allow_zero=True)
        parse_templates(self.templates)


def kmeans(x: torch.Tensor, k: int, iterations: int = 50) -> torch.Tensor:
    """k centres of the rows of ``x`` (Lloyd's iterations from farthest-point seeds: deterministic)."""
    k = min(k, len(x))
    if k <= 0:
        return x[:0]
    idx = [0]
    dist = ((x - x[0]) ** 2).sum(1)
    for _ in range(1, k):
        idx.append(int(dist.argmax()))
        dist = torch.minimum(dist, ((x - x[idx[-1]]) ** 2).sum(1))
    centres = x[idx].clone()
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
        if torch.allclose(new, centres):
            break
        centres = new
    return centres


def null_space_projector(retained: torch.Tensor, threshold: float) -> torch.Tensor:
    """P on the eigenvectors of mean e eᵀ whose eigenvalue is below ``threshold`` (d × d)."""
    cov = retained.T @ retained / max(len(retained), 1)
    values, vectors = torch.linalg.eigh(cov)
    keep = vectors[:, values < threshold]
    return keep @ keep.T


def refine_retained(retained: torch.Tensor, weight: torch.Tensor, unconstrained: torch.Tensor, s: SPEEDSettings,
                    generator: torch.Generator) -> torch.Tensor:
    """Prior filtering and augmentation of the retained states for one layer (steps 2-3)."""
    if s.aug_num == 0 or len(retained) == 0:
        return retained
    if s.prior_filter:
        norms = (retained @ unconstrained.T).norm(dim=1)
        retained = retained[norms > norms.mean()]
    v = torch.linalg.svd(weight, full_matrices=False).Vh[-1]  # W's least singular direction (of min(out, d))
    xi = torch.randn(s.aug_num, len(retained), 1, generator=generator, dtype=F64).to(weight.device)
    moved = (retained.unsqueeze(0) + xi * v).reshape(-1, retained.shape[1])
    norms = (moved @ unconstrained.T).norm(dim=1)
    return torch.cat([retained, moved[norms > norms.mean()]])


def speed_delta(weight: torch.Tensor, targets: torch.Tensor, anchors: torch.Tensor, retained: torch.Tensor,
                null_basis: torch.Tensor, s: SPEEDSettings, generator: torch.Generator,
                pair_scale: float) -> torch.Tensor:
    """Δ for one layer. ``targets``/``anchors``: aligned rows (n, d); ``retained``: (m, d); ``null_basis``: K
    as rows (k, d); ``pair_scale``: the weight of each erasure row (erase_scale / number of pairs)."""
    d = weight.shape[1]
    eye = torch.eye(d, dtype=F64, device=weight.device)
    ct, ca = targets * pair_scale**0.5, anchors * pair_scale**0.5
    gram = ct.T @ ct  # T
    cross = ca.T @ ct  # A
    unconstrained = weight @ torch.linalg.solve(eye + gram, (cross - gram).T).T  # W (A − T)(I + T)⁻¹
    refined = refine_retained(retained, weight, unconstrained, s, generator)
    p = null_space_projector(refined, s.threshold) if len(refined) else eye
    # The ridge part: inputs P c_t mapped to W (P c_t + c_a − c_t), λ = r.
    problem = RidgeProblem([weight], s.retain_scale)
    projected = targets @ p
    problem.add_mapping(projected, projected + anchors - targets, pair_scale)
    delta = problem.solve()[0] - weight
    if len(null_basis):  # the exact correction that keeps K's outputs: Δ − Δ K Q⁻¹ Zᵀ, Z = G⁻¹ P K
        pk = p @ null_basis.T  # (d, k)
        g = s.retain_scale * eye + pair_scale * projected.T @ projected  # P T P + r I
        z = torch.linalg.solve(g, pk)
        q = pk.T @ z + s.null_lam * torch.eye(pk.shape[1], dtype=F64, device=weight.device)
        delta = delta - (delta @ null_basis.T) @ torch.linalg.solve(q, z.T)
    return delta


def names_concept(text: str, concepts) -> bool:
    return any(re.search(r"\b" + re.escape(c.lower()) + r"\b", text.lower()) for c in concepts)


@ERASERS.register
class SPEED(Method):
    name = "speed"
    summary = "SPEED: closed-form K/V edit in the null space of the retained concepts, prior-filtered (seconds)"
    Settings = SPEEDSettings

    def compute(self, pipe, spec: ConceptSpec, s: SPEEDSettings, progress: bool = True) -> Result:
        names, layers = kv_layers(pipe)
        chosen = [(n, l) for n, l in zip(names, layers) if any(tag in n for tag in PARAMS[s.params])]
        pairs = guide_pairs(spec, "erase", s.expand, s.templates)
        # The reference drops retained texts that name an erased concept.
        kept = [t for t in preserved_texts(spec, s.preserve_in_contexts, s.expand, s.templates)
                if not names_concept(t, spec.concepts)]
        states = text_states(pipe, [t for pair in pairs for t in pair] + kept + [UNCONDITIONAL])
        start = time.perf_counter()
        targets, anchors = [], []
        for concept, guide in pairs:
            src, tgt = aligned_positions(pipe, concept, guide, s.tokens)
            targets.append(states[concept][src])
            anchors.append(states[guide][tgt])
        targets, anchors = torch.cat(targets), torch.cat(anchors)
        empty = states[UNCONDITIONAL]
        if kept:
            retained = torch.cat([states[t][positions(pipe, t, s.tokens)] for t in kept])
        else:  # the reference's default retain set: the empty prompt's states after the first
            retained = empty[1:]
        null_basis = torch.cat([empty[:1], kmeans(empty[1:], s.null_clusters)]) if s.null_clusters else empty[:0]
        device = layers[0].weight.device
        targets, anchors, retained, null_basis = (x.to(device) for x in (targets, anchors, retained, null_basis))
        generator = torch.Generator().manual_seed(s.seed)
        pair_scale = s.erase_scale / len(pairs)
        tensors, dtype = {}, layers[0].weight.dtype
        for name, layer in chosen:
            w = layer.weight.detach().to(F64)
            if s.erase_scale == 0:
                tensors[name] = layer.weight.detach().clone()
                continue
            delta = speed_delta(w, targets, anchors, retained, null_basis, s, generator, pair_scale)
            tensors[name] = (w + delta).to(dtype)
        solve_s = time.perf_counter() - start
        return Result(tensors, solve_s, {"layers": len(tensors), "erase_rows": len(targets),
                                         "retained_rows": len(retained)})

"""UCE on flow-matching transformers (SD3, FLUX.1): the closed-form edit of the joint blocks' text-side K/V.

In a UNet the K/V projections read the text states themselves; in a joint-attention block
(``transformer_blocks.<i>.attn.add_k_proj`` / ``add_v_proj``, the family's attention sites) they read the text
stream after the earlier blocks and the block's timestep modulation (``norm1_context``). So the rows of each
site's ridge problem are the inputs that site sees: captured by forward pre-hooks while the transformer runs on a
fixed noise latent (seed 0) at `SIGMAS`, one call per text and sigma, stacked over the sigmas. Each site is then
solved on its own (its K and V share the input), with UCE's terms: the concept's selected positions mapped to the
guide's outputs under the original weights (``replace``) or the official tensor-projection targets (``tensor``),
the preserved concepts mapped to themselves, ``lam`` pulling towards the original weights.

Token positions live in the joint text sequence: SD3 = [77 CLIP positions | T5 positions], FLUX = [T5 positions];
``last`` is each segment's last word token, ``last+end`` from it to the segment's end, ``all`` everything.

``targets=reference-flux`` is the variant of the reference UCE FLUX script (rohitgandikota/unified-concept-editing
``trainscripts/uce_flux_edit.py``): instead of the blocks' K/V it edits the transformer's ``context_embedder`` (its
input: the text states, T5 on FLUX, the joint [CLIP | T5] sequence on SD3) and the pooled text embedder's first
linear layer ``time_text_embed.text_embedder.linear_1`` (its input: the pooled CLIP embedding, one row a text),
with the same closed form; ``both`` edits the blocks and the embedders, each solved on the original model's
inputs. Difference: the script's targets v* are the layers' outputs, bias included (W0 g + b, so its edit maps
W c + b to W0 g + 2b); erasekit's are W0 g (the layer adds b to both sides), as in the UNet UCE. The script's
settings are UCE's defaults here (lam 0.5, scales 1, the last token, the empty prompt as guide).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erasekit.erasers.ridge import F64, RidgeProblem

SIGMAS = (0.75, 0.5, 0.25)  # where the inputs are captured (noise -> clean); stacked rows


def segments(pipe, family) -> list[tuple[object, int, int]]:
    """(tokenizer, start, length) of each part of the family's text sequence."""
    if family.name == "sd3":
        clip = int(pipe.tokenizer_max_length)
        return [(pipe.tokenizer, 0, clip), (pipe.tokenizer_3, clip, family.t5_tokens(pipe))]
    from erasekit.diffusion.flux import FLUX_T5_TOKENS

    return [(pipe.tokenizer_2, 0, family.t5_length(pipe, pipe.tokenizer_2, FLUX_T5_TOKENS))]


def _last(tok, text: str, length: int) -> int:
    mask = tok([text], padding="max_length", max_length=length, truncation=True, return_tensors="pt").attention_mask
    return max(int(mask[0].sum()) - 2, 0)  # the token before the final EOS / </s>


def aligned_positions(pipe, family, source: str, target: str, policy: str) -> tuple[list[int], list[int]]:
    """Positions (source[i] -> target[i]) in the joint text sequence, per segment as `erasers.tokens` does."""
    src, tgt = [], []
    for tok, start, length in segments(pipe, family):
        ls, lt = _last(tok, source, length), _last(tok, target, length)
        if policy == "last":
            a, b = [ls], [lt]
        elif policy == "last+end":
            n = length - max(ls, lt)
            a, b = list(range(ls, ls + n)), list(range(lt, lt + n))
        elif policy == "all":
            a = b = list(range(length))
        else:
            raise ValueError(f"unknown token policy {policy!r}")
        src += [start + i for i in a]
        tgt += [start + i for i in b]
    return src, tgt


@torch.no_grad()
def site_inputs(pipe, family, sites, texts, sigmas=SIGMAS, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Per text, per site: the inputs of the site's K/V projections, (len(sigmas) * T, D) float64."""
    from erasekit.diffusion.guidance import UNetDenoiser

    model = family.denoiser(pipe)
    texts = list(dict.fromkeys(texts))
    h, w = family.image_size(pipe)
    shape = family.latent_shape(pipe, h, w)
    noise = torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(seed))
    records: list[list[torch.Tensor]] = [[] for _ in sites]
    handles = [site.key.register_forward_pre_hook(lambda m, args, i=i: records[i].append(args[0].detach()))
               for i, site in enumerate(sites)]
    denoiser = UNetDenoiser(model, family)
    try:
        for text in texts:
            cond = family.encode(pipe, [text], device=model.device)
            for s in sigmas:
                t = torch.tensor(float(s) * family.schedule(pipe).num_train_timesteps)
                denoiser(noise, t, cond)
    finally:
        for handle in handles:
            handle.remove()
    out: dict[str, list[torch.Tensor]] = {}
    k = len(sigmas)
    for j, text in enumerate(texts):
        out[text] = [torch.cat([r[0].to(F64) for r in rec[j * k : (j + 1) * k]]) for rec in records]
    return out


def _rows(x: torch.Tensor, pos: list[int], n_sigmas: int, length: int) -> torch.Tensor:
    return x[[p + k * length for k in range(n_sigmas) for p in pos]]


TARGETS = ("blocks", "reference-flux", "both")
CONTEXT_EMBEDDER = "transformer.context_embedder"
POOLED_EMBEDDER = "transformer.time_text_embed.text_embedder.linear_1"


@dataclass
class Unit:
    """Linear layers that read one input, solved together: a joint site's K and V (inputs captured inside the
    transformer), or one of the text embedders (``context_embedder`` on the text states, the pooled embedder's
    ``linear_1`` on the pooled CLIP output). ``inputs[text]``: (R, L, d) float64, R repeats (the capture sigmas,
    1 for an embedder) of L positions (the joint text sequence; 1 for the pooled embedding)."""

    layers: list[tuple[str, torch.nn.Linear]]
    inputs: dict[str, torch.Tensor]
    pooled: bool = False

    @property
    def weights(self) -> list[torch.Tensor]:
        return [layer.weight for _, layer in self.layers]

    def rows(self, text: str, pos: list[int] | None = None) -> torch.Tensor:
        """The rows of ``text`` at positions ``pos`` (None: all), repeat-major, (R * len(pos), d)."""
        x = self.inputs[text]
        if pos is not None and not self.pooled:
            x = x[:, pos]
        return x.reshape(-1, x.shape[-1])


def embedder_units(pipe, family, texts) -> list[Unit]:
    """The reference UCE FLUX script's modules (trainscripts/uce_flux_edit.py): ``context_embedder`` on the text
    states (FLUX: T5; SD3: the joint [CLIP | T5] sequence) and the pooled text embedder's first linear layer on
    the pooled CLIP embedding."""
    from erasekit.errors import ErasekitError

    tr = pipe.transformer
    ctx = getattr(tr, "context_embedder", None)
    pooled = getattr(getattr(getattr(tr, "time_text_embed", None), "text_embedder", None), "linear_1", None)
    if not isinstance(ctx, torch.nn.Linear) or not isinstance(pooled, torch.nn.Linear):
        raise ErasekitError(f"targets=reference-flux edits the transformer's context_embedder and "
                            f"time_text_embed.text_embedder.linear_1; {type(tr).__name__} lacks them")
    texts = list(dict.fromkeys(texts))
    with torch.no_grad():
        cond = family.encode(pipe, texts, device=tr.device)
    states, vec = cond.states.to(F64), cond.added["pooled"].to(F64)
    return [Unit([(CONTEXT_EMBEDDER, ctx)], {t: states[j][None] for j, t in enumerate(texts)}),
            Unit([(POOLED_EMBEDDER, pooled)], {t: vec[j][None, None] for j, t in enumerate(texts)}, pooled=True)]


def units(pipe, family, texts, targets: str = "blocks") -> list[Unit]:
    """What UCE / RECE edit on a flow family: the joint sites (``blocks``), the embedders (``reference-flux``), or
    both; every unit's inputs are the original model's."""
    if targets not in TARGETS:
        raise ValueError(f"unknown targets {targets!r}")
    out = []
    if targets in ("blocks", "both"):
        sites = family.attention_sites(pipe)
        captured = site_inputs(pipe, family, sites, texts)
        for i, site in enumerate(sites):
            out.append(Unit(list(site.kv()), {t: x[i].reshape(len(SIGMAS), -1, x[i].shape[-1])
                                              for t, x in captured.items()}))
    if targets in ("reference-flux", "both"):
        out += embedder_units(pipe, family, texts)
    return out


def add_terms(problem: RidgeProblem, unit: Unit, pipe, family, pairs, preserve, s) -> None:
    """UCE's rows for one unit (as `erasers.uce.add_uce_terms`): concept -> guide at the aligned positions
    (``replace``: the guide's outputs under the problem's starting weights; ``tensor``: the official projection
    targets), the preserved texts mapped to themselves."""
    from erasekit.erasers.tokens import TOKEN_POLICIES

    for concept, guide in pairs:
        src, tgt = aligned_positions(pipe, family, concept, guide, s.tokens)
        c, g = unit.rows(concept, src), unit.rows(guide, tgt)
        if s.technique == "replace":
            problem.add_mapping(c, g, s.erase_scale)
        else:  # the official tensor technique: remove the concept's direction, keep the orthogonal part
            targets = []
            for w in problem.w0:
                u = c @ w.T
                u = u / u.norm()
                v = g @ w.T
                targets.append(v - (u * v).sum() * u)
            problem.add(c, targets, s.erase_scale)
    policy = s.tokens if getattr(s, "preserve_tokens", "same") == "same" else s.preserve_tokens
    if policy not in TOKEN_POLICIES:
        raise ValueError(f"unknown token policy {policy!r}")
    for text in preserve:
        pos, _ = aligned_positions(pipe, family, text, text, policy)
        x = unit.rows(text, pos)
        problem.add_mapping(x, x, s.preserve_scale)


def unit_texts(pairs, preserve, extra=()) -> list[str]:
    return list(dict.fromkeys([t for pair in pairs for t in pair] + list(preserve) + list(extra)))


def flow_uce(pipe, spec, s, pairs, preserve) -> tuple[dict[str, torch.Tensor], int]:
    """New weights of every edited layer (qualified names) and the number of rows, for UCE settings ``s``
    (``s.targets``: the joint sites' K/V, the reference FLUX script's embedders, or both)."""
    from erasekit.diffusion.family import family_of

    family = family_of(pipe)
    tensors, rows = {}, 0
    for unit in units(pipe, family, unit_texts(pairs, preserve), getattr(s, "targets", "blocks")):
        problem = RidgeProblem(unit.weights, s.lam)
        add_terms(problem, unit, pipe, family, pairs, preserve, s)
        rows += problem.n_rows
        for (name, layer), new in zip(unit.layers, problem.solve(s.solver)):
            tensors[f"{name}.weight"] = new.to(layer.weight.dtype)
    return tensors, rows

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
"""

from __future__ import annotations

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


def flow_uce(pipe, spec, s, pairs, preserve) -> tuple[dict[str, torch.Tensor], int]:
    """New K/V weights of every site (qualified names) and the number of rows, for UCE settings ``s``."""
    from erasekit.diffusion.family import family_of
    from erasekit.erasers.tokens import TOKEN_POLICIES

    family = family_of(pipe)
    sites = family.attention_sites(pipe)
    texts = [t for pair in pairs for t in pair] + list(preserve)
    inputs = site_inputs(pipe, family, sites, texts)
    length = sum(n for _, _, n in segments(pipe, family))
    policy = s.tokens if getattr(s, "preserve_tokens", "same") == "same" else s.preserve_tokens
    if policy not in TOKEN_POLICIES:
        raise ValueError(f"unknown token policy {policy!r}")
    tensors, rows = {}, 0
    for i, site in enumerate(sites):
        problem = RidgeProblem([site.key.weight, site.value.weight], s.lam)
        for concept, guide in pairs:
            src, tgt = aligned_positions(pipe, family, concept, guide, s.tokens)
            c = _rows(inputs[concept][i], src, len(SIGMAS), length)
            g = _rows(inputs[guide][i], tgt, len(SIGMAS), length)
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
        for text in preserve:
            pos, _ = aligned_positions(pipe, family, text, text, policy)
            x = _rows(inputs[text][i], pos, len(SIGMAS), length)
            problem.add_mapping(x, x, s.preserve_scale)
        new_k, new_v = problem.solve(s.solver)
        rows += problem.n_rows
        (k_name, _), (v_name, _) = site.kv()
        tensors[f"{k_name}.weight"] = new_k.to(site.key.weight.dtype)
        tensors[f"{v_name}.weight"] = new_v.to(site.value.weight.dtype)
    return tensors, rows

"""MACE, Mass Concept Erasure (Lu et al., CVPR 2024; code Shilin-LU/MACE): three stages on the cross-attention K/V.

1. closed-form refinement (CFR, ``src/cfr_utils.py``): the concept in ``templates`` contexts and the same contexts
   with the concept replaced by ``mapping``; the tokens the two prompts share (common prefix and suffix, and the
   padding after them, aligned) are mapped: the concept prompt's states c -> W0 applied to the mapped prompt's
   states, W = (λ W0 + Σ v cᵀ)(λ I + Σ c cᵀ)⁻¹ over every K/V layer: the residue of the concept that the
   co-occurring words carry is removed (the concept's own tokens are left to stage 2);
2. one LoRA per concept (rank ``rank``, on every attn2 to_k and to_v of the refined model), trained ``steps``
   steps on images of the concept to suppress the concept tokens' attention inside the concept's region:
   loss = Σ_layers ||softmax(q kᵀ/√d)[mask positions, concept tokens]|| (per head, as MACE's AttnController), with
   timesteps drawn from MACE's importance-sampling density σ(0.05(t − 200)) − σ(0.05(t − 400));
3. the LoRAs fused in closed form: W = (λ W_cfr + Σ_c Σ (W_cfr + B_c A_c) c cᵀ)(λ I + Σ_c Σ c cᵀ)⁻¹ over every
   position of each concept's prompts.

Masks (`erasekit.erasers.mace_masks`): the renderer's ground truth on the embedded world; on other models a mask
folder, or the original model's own cross-attention (a documented substitute for Grounded-SAM), or none (styles).
Solves are erasekit's ridge solver (float64). ``preserve`` concepts add rows that keep their outputs in both closed
forms (weight ``preserve_scale``; MACE's own preservation caches of COCO captions are off by default in its
configs). ``erase_scale`` weights every erasure row: 0 gives the original weights exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from erasekit.diffusion.sdpa import training_attention
from erasekit.erasers.concept import ConceptSpec
from erasekit.erasers.method import Method, Result
from erasekit.erasers.ridge import F64, RidgeProblem
from erasekit.erasers.uce import EXPANSIONS, kv_layers, parse_templates, text_states
from erasekit.errors import ErasekitError
from erasekit.registry import ERASERS
from erasekit.settings import Settings, choice, positive

MASKS = ("auto", "truth", "folder", "attention", "none")


@dataclass
class MACESettings(Settings):
    mapping: str | None = None  # what the concept becomes in CFR (None: the guide; MACE's objects: "ground")
    templates: str = ""  # ";"-separated contexts with "{c}" (default: short object contexts)
    lam: float = 1000.0  # λ of both closed forms (MACE's lamb)
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    cfr: bool = True
    lora: bool = True
    rank: int = 1
    steps: int = 50  # LoRA steps per concept (MACE: 50, batch 1, lr 1e-5 on SD-1.4)
    lr: float = 1e-5
    batch_size: int = 1
    importance_sampling: bool = True
    images: int = 8  # concept images per concept (embedded world: rendered)
    image_folder: str = ""  # other models: the concept images (a subfolder per concept when there are several)
    mask_folder: str = ""  # their masks, one per image with the same file stem (white = the concept)
    masks: str = choice("auto", *MASKS)  # auto: truth on the embedded world, else folder if given, else attention
    attention_threshold: float = 0.5
    seed: int = 0

    def validate(self) -> None:
        positive(self, "lam", "lr", "images", "batch_size")
        positive(self, "erase_scale", "preserve_scale", "steps", allow_zero=True)
        if self.rank < 1:
            raise ErasekitError(f"setting rank={self.rank}: a LoRA rank must be >= 1")
        if not 0 < self.attention_threshold < 1:
            raise ErasekitError(f"setting attention_threshold={self.attention_threshold}: must be in (0, 1)")
        if self.masks == "folder" and not self.mask_folder.strip():
            raise ErasekitError("mace with masks=folder needs mask_folder=<folder of masks>")
        if self.mask_folder.strip() and not self.image_folder.strip():
            raise ErasekitError("mace: mask_folder is given without image_folder (the images the masks belong to)")
        parse_templates(self.templates)

    def contexts(self) -> tuple[str, ...]:
        return parse_templates(self.templates) if self.templates.strip() else EXPANSIONS["object"]


def matching_indices(old: list[int], new: list[int]) -> tuple[list[int], list[int]]:
    """Positions of the common prefix and common suffix of two token-id lists (MACE's find_matching_indices)."""
    start = 0
    for a, b in zip(old, new):
        if a != b:
            break
        start += 1
    eo, en = len(old) - 1, len(new) - 1
    while eo >= start and en >= start and old[eo] == new[en]:
        eo, en = eo - 1, en - 1
    return list(range(start)) + list(range(eo + 1, len(old))), list(range(start)) + list(range(en + 1, len(new)))


def extended_indices(old: list[int], new: list[int], length: int) -> tuple[list[int], list[int]]:
    """The matching positions plus the padding after them, aligned and cut to the same length (MACE's prepare_k_v)."""
    oi, ni = matching_indices(old, new)
    if oi[-1] >= ni[-1]:
        return oi + list(range(oi[-1] + 1, length)), ni + list(range(ni[-1] + 1, length - (oi[-1] - ni[-1])))
    return oi + list(range(oi[-1] + 1, length - (ni[-1] - oi[-1]))), ni + list(range(ni[-1] + 1, length))


def _ids(pipe, text: str) -> list[int]:
    return list(pipe.tokenizer(text).input_ids)


def concept_pairs(spec: ConceptSpec, s: MACESettings) -> list[tuple[str, str, str]]:
    """(concept, prompt with it, prompt with the mapping) for every concept and context."""
    mapping = spec.guide if s.mapping is None else s.mapping
    return [(c, t.format(c=c), " ".join(t.format(c=mapping).split())) for c in spec.concepts for t in s.contexts()]


def concept_token_positions(pipe, prompt: str, mapped: str) -> list[int]:
    """The tokens of ``prompt`` that are not shared with ``mapped``: the concept's own."""
    old = _ids(pipe, prompt)
    oi, _ = matching_indices(old, _ids(pipe, mapped))
    return [i for i in range(len(old)) if i not in set(oi)]


def add_cfr_rows(problem: RidgeProblem, pipe, states, pairs, s: MACESettings) -> None:
    length = int(pipe.tokenizer.model_max_length)
    for _, old, new in pairs:
        oi, ni = extended_indices(_ids(pipe, old), _ids(pipe, new), length)
        problem.add_mapping(states[old][oi], states[new][ni], s.erase_scale)


def add_preserve_rows(problem: RidgeProblem, states, preserve, s: MACESettings, through=None) -> None:
    for text in preserve:
        problem.add_mapping(states[text], states[text], s.preserve_scale, through=through)


# -- stage 2: the LoRAs ---------------------------------------------------------------------------------------------
def importance_weights(n_train: int) -> np.ndarray:
    t = np.arange(n_train, dtype=np.float64)
    f = 1 / (1 + np.exp(-0.05 * (t - 200))) - 1 / (1 + np.exp(-0.05 * (t - 400)))
    return f / f.sum()


class AttentionLoss:
    """Attention processors on every attn2 that add, for the concept tokens inside the mask, the norm of their
    attention probabilities (per head) to ``terms``; the module's own output is computed as usual."""

    def __init__(self):
        self.terms: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # (B, h, w) float at latent resolution
        self.tokens: list[int] = []

    def processor(self, original):
        loss = self

        def call(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
            out = original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
            if encoder_hidden_states is not None:
                loss._record(attn, hidden_states, encoder_hidden_states)
            return out

        return call

    def _record(self, attn, x, enc) -> None:
        if x.ndim == 4:
            b, c, hh, ww = x.shape
            x = x.view(b, c, hh * ww).transpose(1, 2)
        if getattr(attn, "norm_cross", None):
            enc = attn.norm_encoder_hidden_states(enc)
        b, n = x.shape[:2]
        probs = attn.get_attention_scores(attn.head_to_batch_dim(attn.to_q(x)), attn.head_to_batch_dim(attn.to_k(enc)))
        heads = probs.shape[0] // b
        probs = probs[..., self.tokens]  # (B*heads, N, T_c)
        if self.mask is not None:
            keep = layer_mask(self.mask, n)  # (B, N) bool
            keep = keep.repeat_interleave(heads, 0)
            probs = probs * keep[..., None]
        self.terms.append(probs.norm())


def layer_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """(B, h, w) mask -> (B, n) bool for a layer with n queries on a grid of the same aspect (nearest)."""
    b, h, w = mask.shape
    f = math.sqrt(h * w / n)
    for hl, wl in ((round(h / f), round(w / f)), (math.ceil(h / f), math.ceil(w / f)),
                   (math.floor(h / f), math.floor(w / f))):
        if hl * wl == n:
            break
    else:
        raise ValueError(f"cannot place {n} queries on a {h}x{w} grid")
    small = torch.nn.functional.interpolate(mask[:, None].float(), size=(hl, wl), mode="nearest")[:, 0]
    return (small > 0.5).reshape(b, n)


class LoRA:
    """Rank-r deltas B A on linear layers through forward hooks (diffusers' LoRALinearLayer initialisation)."""

    def __init__(self, layers, rank: int, gen: torch.Generator):
        self.params = []
        self.handles = []
        for layer in layers:
            out_f, in_f = layer.weight.shape
            down = torch.nn.Parameter(torch.randn(rank, in_f, generator=gen) / rank)
            up = torch.nn.Parameter(torch.zeros(out_f, rank))
            self.params.append((down, up))
            self.handles.append(layer.register_forward_hook(self._hook(down, up)))

    @staticmethod
    def _hook(down, up):
        def hook(module, args, out):
            x = args[0]
            return out + (x.to(down.dtype) @ down.T @ up.T).to(out.dtype)
        return hook

    def deltas(self) -> list[torch.Tensor]:
        return [(up @ down).detach().to(F64) for down, up in self.params]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def concept_data(pipe, concept: str, s: MACESettings, prompts, mapped):
    """Latents (n, C, h, w), masks (n, h, w) float or None, for one concept."""
    from erasekit.diffusion.vae import encode_images, image_size
    from erasekit.worlds.toy import is_toy_pipeline

    from erasekit.erasers import mace_masks

    size = image_size(pipe)
    toy = is_toy_pipeline(pipe)
    mode = s.masks
    if mode == "auto":
        mode = "truth" if toy and not s.image_folder else ("folder" if s.mask_folder else "attention")
    if s.image_folder:
        if mode == "truth":
            raise ErasekitError("mace: masks=truth is the embedded world's renderer; with image_folder use "
                                "masks=folder, attention or none")
        images, masks = mace_masks.folder_images_and_masks(s.image_folder, s.mask_folder if mode == "folder" else "",
                                                           concept, size)
        images = images[: s.images]
        masks = masks[: s.images] if masks is not None else None
    elif toy:
        if mode == "folder":
            raise ErasekitError("mace: masks=folder needs image_folder=<the images the masks belong to>")
        images, masks = mace_masks.rendered_with_truth(concept, s.images, size[0], s.seed)
        masks = masks if mode == "truth" else None
    else:
        raise ErasekitError("mace on this model needs image_folder=<concept images> (the embedded world renders "
                            "its own), or lora=false for the closed-form refinement alone")
    latents = encode_images(pipe, images).float()
    h, w = latents.shape[-2:]
    if masks is not None:
        m = torch.from_numpy(np.asarray(masks, dtype=np.float32))[:, None]
        masks = (torch.nn.functional.interpolate(m, size=(h, w), mode="area")[:, 0] > 0.5).float()
    elif mode == "attention":
        states = text_states(pipe, [prompts[0]])[prompts[0]][None].to(pipe.unet.dtype)
        tokens = concept_token_positions(pipe, prompts[0], mapped[0])
        masks = torch.from_numpy(mace_masks.attention_masks(pipe, latents, states.expand(len(latents), -1, -1),
                                                            tokens, s.attention_threshold, s.seed)).float()
    return latents, masks


@training_attention()  # backward through SDPA: no cuDNN attention (its backward faults)
def train_lora(pipe, layers, concept: str, prompts, mapped, s: MACESettings, gen: torch.Generator) -> list:
    """One concept's LoRA deltas (F64, per layer) on the current weights."""
    from diffusers import DDPMScheduler

    from erasekit.diffusion.family import family_of

    unet = pipe.unet
    latents, masks = concept_data(pipe, concept, s, prompts, mapped)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    n_train = sched.config.num_train_timesteps
    probs = importance_weights(n_train) if s.importance_sampling else np.full(n_train, 1.0 / n_train)
    rng = np.random.default_rng(s.seed)
    family = family_of(pipe)
    with torch.no_grad():
        conds = {p: family.encode(pipe, [p], device=unet.device) for p in dict.fromkeys(prompts)}
    tokens = {p: concept_token_positions(pipe, p, m) for p, m in zip(prompts, mapped)}
    lora = LoRA(layers, s.rank, gen)
    opt = torch.optim.AdamW([p for pair in lora.params for p in pair], lr=s.lr)
    loss_fn = AttentionLoss()
    original = dict(unet.attn_processors)
    installed = {k: (loss_fn.processor(v) if k.endswith("attn2.processor") else v) for k, v in original.items()}
    flags = [p.requires_grad for p in unet.parameters()]
    try:
        for p in unet.parameters():
            p.requires_grad_(False)
        unet.set_attn_processor(dict(installed))
        for step in range(s.steps):
            idx = rng.integers(len(latents), size=s.batch_size)
            prompt = prompts[step % len(prompts)]
            t = torch.as_tensor(rng.choice(n_train, size=s.batch_size, p=probs), dtype=torch.long)
            noise = torch.randn(latents[idx].shape, generator=gen)
            noisy = sched.add_noise(latents[idx], noise, t).to(unet.device, unet.dtype)
            cond = conds[prompt].expand(s.batch_size).to(unet.device, unet.dtype)
            loss_fn.terms, loss_fn.tokens = [], tokens[prompt]
            loss_fn.mask = masks[idx].to(unet.device) if masks is not None else None
            unet(noisy, t.to(unet.device), **cond.unet_kwargs())
            loss = torch.stack(loss_fn.terms).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        unet.set_attn_processor(dict(original))
        for p, f in zip(unet.parameters(), flags):
            p.requires_grad_(f)
        lora.remove()
    return lora.deltas()


@ERASERS.register
class MACE(Method):
    name = "mace"
    summary = "MACE: closed-form refinement of co-occurring words + per-concept attention LoRAs fused in closed form"
    Settings = MACESettings

    def compute(self, pipe, spec: ConceptSpec, s: MACESettings, progress: bool = True) -> Result:
        from erasekit.erasers.base import _parameter

        names, layers = kv_layers(pipe)
        pairs = concept_pairs(spec, s)
        preserve = [t.format(c=p) for p in spec.preserve for t in s.contexts()]
        states = text_states(pipe, [t for _, o, n in pairs for t in (o, n)] + preserve)
        original = [layer.weight.detach().clone() for layer in layers]
        dtype = layers[0].weight.dtype
        start = time.perf_counter()
        if s.erase_scale == 0:
            return Result({n: w for n, w in zip(names, original)}, 0.0, {"stages": []})
        stages = []
        current = [w.to(F64) for w in original]
        if s.cfr:
            problem = RidgeProblem(original, s.lam)
            add_cfr_rows(problem, pipe, states, pairs, s)
            add_preserve_rows(problem, states, preserve, s)
            current = problem.solve()
            stages.append("cfr")
        losses_s = 0.0
        if s.lora and s.steps > 0:
            gen = torch.Generator().manual_seed(s.seed)
            params = [_parameter(pipe, n) for n in names]
            fused = RidgeProblem(current, s.lam)
            try:
                with torch.no_grad():
                    for p, w in zip(params, current):
                        p.copy_(w.to(p.dtype))
                for concept in spec.concepts:
                    mine = [(o, n) for c, o, n in pairs if c == concept]
                    t0 = time.perf_counter()
                    deltas = train_lora(pipe, layers, concept, [o for o, _ in mine], [n for _, n in mine], s, gen)
                    losses_s += time.perf_counter() - t0
                    for prompt, _ in mine:
                        c = states[prompt]
                        fused.add(c, [c @ (w + d).T for w, d in zip(current, deltas)], s.erase_scale)
            finally:
                with torch.no_grad():
                    for p, w in zip(params, original):
                        p.copy_(w)
            add_preserve_rows(fused, states, preserve, s, through=original)
            current = fused.solve()
            stages += ["lora", "fuse"]
        solve_s = time.perf_counter() - start
        return Result({n: w.to(dtype) for n, w in zip(names, current)}, solve_s,
                      {"stages": stages, "lora_s": round(losses_s, 3), "prompts": len(pairs)})

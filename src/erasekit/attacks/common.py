"""What the prompt-optimising attacks share (UnlearnDiffAtk, P4D, Ring-A-Bell; textual inversion's freezing).

- vocabulary: `candidate_vocabulary` (whole-word tokens a user can type), `tokens_text` (ids -> the typed prompt);
- prefixes: `check_prefix_settings` (k, iterations, batch size, lr), `world_prompts` (the prompts attacked),
  `frozen` (no weight of the model requires grad while prefix vectors or a token are fitted);
- targets: `original_latents` (the ORIGINAL model's final latents of (prompt, seed): the images the attack aims at),
  `draw` / `detect` / `before_attack` (what the attacked target draws, and whether the concept is already there);
- states: `StatesTable`, ready-made text states per prompt label (soft prompts, shifted embeddings) that generation
  reads as a learned embedding (`GenerationInputs.learned`), saved as safetensors for the cache.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import torch

from erasekit.attacks.base import AttackContext
from erasekit.diffusion.conditioning import Conditioning
from erasekit.errors import ErasekitError

_VOCAB_CACHE: dict = {}


# -- vocabulary ------------------------------------------------------------------------------------------------
def candidate_vocabulary(tokenizer, exclude_words=()) -> torch.Tensor:
    """Ids of whole-word tokens that decode to letters and tokenise back to exactly themselves."""
    key = (id(tokenizer), len(tokenizer), tuple(sorted(exclude_words)))
    if key in _VOCAB_CACHE:
        return _VOCAB_CACHE[key]
    special = set(tokenizer.all_special_ids)
    ids, texts = [], []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([i]).strip()
        if text.isalpha() and text.isascii() and len(text) > 1:
            ids.append(i)
            texts.append(text)
    back = tokenizer(texts, add_special_tokens=False).input_ids if texts else []
    banned = {w.lower() for w in exclude_words}
    keep = [i for i, t, b in zip(ids, texts, back) if b == [i] and t.lower() not in banned]
    if not keep:
        raise ErasekitError("no whole-word tokens in this tokenizer's vocabulary to build adversarial prompts from")
    out = torch.tensor(keep, dtype=torch.long)
    _VOCAB_CACHE[key] = out
    return out


def tokens_text(tokenizer, ids) -> str:
    return " ".join(tokenizer.decode([int(i)]).strip() for i in ids)


# -- prefixes --------------------------------------------------------------------------------------------------
def check_prefix_settings(attack: str, s) -> None:
    """The checks every prefix-optimising attack shares: k, iterations, batch_size >= 1; lr > 0 when set."""
    from erasekit.checks import finite, integer

    for name in ("k", "iterations", "batch_size"):
        if integer(f"{attack}: {name}", getattr(s, name)) < 1:
            raise ErasekitError(f"{attack}: {name} must be at least 1, got {getattr(s, name)}")
    if s.lr is not None:
        finite(f"{attack}: lr", s.lr, low=0.0, low_open=True)


def world_prompts(ctx: AttackContext, given: str, n: int) -> list[str]:
    """``n`` prompts cycling over ``given`` (";"-separated) or, when empty, the world's prompts naming the concept."""
    world = ctx.target.world
    base = [p.strip() for p in given.split(";") if p.strip()] or world.concept_prompts(world.check_concept(ctx.concept))
    return [base[i % len(base)] for i in range(n)]


def pipeline_modules(pipe) -> list:
    """The pipeline's UNet or transformer, text encoder(s) and VAE (those it has)."""
    names = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
    return [m for m in (getattr(pipe, name, None) for name in names) if m is not None]


@contextmanager
def frozen(*parts):
    """No parameter of ``parts`` requires grad inside (restored after, also on errors); a pipeline stands for its
    `pipeline_modules`. Only the attack's own vectors are then trained."""
    modules = [m for part in parts if part is not None
               for m in ([part] if isinstance(part, torch.nn.Module) else pipeline_modules(part))]
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


# -- targets ---------------------------------------------------------------------------------------------------
def by_guidance(scales, run):
    """``run(indices, scale)`` once per distinct scale of ``scales`` (a float: one for all); results in order."""
    n = len(scales) if isinstance(scales, (list, tuple)) else None
    if n is None:
        return run(None, float(scales))
    out = [None] * n
    for g in dict.fromkeys(scales):
        idx = [i for i, x in enumerate(scales) if x == g]
        for i, r in zip(idx, run(idx, float(g))):
            out[i] = r
    return out


def original_latents(ctx: AttackContext, prompts, seeds, steps: int, scale, batch_size: int) -> torch.Tensor:
    """Final latents (scaled, before decoding) the ORIGINAL model draws from (prompt, seed); ``scale``: one
    guidance scale or one per image."""
    from erasekit.probes.sampling import sample

    original = ctx.original

    def run(idx, g):
        ps, ss = (prompts, seeds) if idx is None else ([prompts[i] for i in idx], [seeds[i] for i in idx])
        out = []
        for i in range(0, len(ps), batch_size):
            out.append(sample(original, ps[i : i + batch_size], ss[i : i + batch_size], steps=steps, scale=g,
                              decode=False).float().cpu())
        return torch.cat(out) if idx is None else list(torch.cat(out))

    got = by_guidance(scale, run)
    return got if torch.is_tensor(got) else torch.stack(got)


def detect(ctx: AttackContext, images: np.ndarray) -> list[dict]:
    """The scenario's detector's rows for ``images`` (the world's default detector when the scenario gave none)."""
    if ctx.detector is None:
        ctx.detector = ctx.target.world.detector(ctx.concept)
    return ctx.detector.score(images)


def draw(ctx: AttackContext, prompts, seeds, steps: int, scale) -> np.ndarray:
    """The target's images of (prompt, seed); ``scale``: one guidance scale or one per image."""
    from erasekit.generation import generate

    def run(idx, g):
        ps, ss = (prompts, seeds) if idx is None else ([prompts[i] for i in idx], [seeds[i] for i in idx])
        images = generate(ctx.target, ps, ss, steps=steps, guidance=g, batch_size=ctx.batch_size, progress=False)
        return images if idx is None else list(images)

    got = by_guidance(scale, run)
    return got if isinstance(got, np.ndarray) else np.stack(got)


def before_attack(ctx: AttackContext, prompts, seeds, steps: int, scale) -> list[bool]:
    """Per image: does the target (edits and defences) already draw the concept from (prompt, seed)?"""
    return [r["present"] for r in detect(ctx, draw(ctx, prompts, seeds, steps, scale))]


# -- states ----------------------------------------------------------------------------------------------------
def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32)


POOLED_KEYS = ("text_embeds", "pooled")  # a Conditioning's pooled text embedding: SDXL's, SD3 / FLUX.1's


class StatesTable:
    """Ready-made text states per prompt label: the `GenerationInputs.learned` interface (``encode``, ``digest``).
    On SDXL, SD3 and FLUX.1 each label also has its pooled text embedding (``pooled``, kept under the family's
    key ``pooled_key``), and ``encode`` gives a `Conditioning`."""

    def __init__(self, states: dict[str, torch.Tensor] | None = None, pooled: dict[str, torch.Tensor] | None = None,
                 pooled_key: str = "text_embeds"):
        self.states = {k: _cpu(v) for k, v in (states or {}).items()}
        self.pooled = {k: _cpu(v) for k, v in (pooled or {}).items()}
        self.pooled_key = pooled_key

    def add(self, labels, cond: Conditioning) -> "StatesTable":
        """Item j of ``cond`` under ``labels[j]`` (its states, and the pooled embedding when there)."""
        key = next((k for k in POOLED_KEYS if k in cond.added), None)
        pooled = cond.added.get(key) if key is not None else None
        if key is not None:
            self.pooled_key = key
        for j, label in enumerate(labels):
            self.states[label] = _cpu(cond.states[j])
            if pooled is not None:
                self.pooled[label] = _cpu(pooled[j])
        return self

    def encode(self, pipe, prompts, device=None):
        from erasekit.diffusion.family import family_of

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encoder = family_of(pipe).encoders(pipe)[-1][2]  # the one whose dtype `family.encode` gives
        device, dtype = device or encoder.device, encoder.dtype
        out = torch.stack([self.states[p] for p in prompts]).to(device, dtype)
        if not self.pooled:
            return out
        return Conditioning(out, {self.pooled_key: torch.stack([self.pooled[p] for p in prompts]).to(device, dtype)})

    def digest(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for table, tag in ((self.states, ""), (self.pooled, "pooled:")):
            for k in sorted(table):
                h.update((tag + k).encode())
                h.update(table[k].contiguous().reshape(-1).view(torch.uint8).numpy().data)
        return h.hexdigest()[:16]

    def save(self, path) -> None:
        """``path`` (safetensors) and the labels in the JSON beside it (written last: its presence marks both)."""
        from erasekit.store import write_safetensors_atomic

        labels = sorted(self.states)
        tensors = {"states": torch.stack([self.states[k] for k in labels]).contiguous()}
        if self.pooled:
            tensors["pooled"] = torch.stack([self.pooled[k] for k in labels]).contiguous()
        record = {"labels": labels} if self.pooled_key == "text_embeds" else {"labels": labels,
                                                                             "pooled_key": self.pooled_key}
        write_safetensors_atomic(path, tensors, record)

    @classmethod
    def load(cls, path) -> "StatesTable":
        from erasekit.safe_load import load_safetensors

        tensors = load_safetensors(path, "cached soft-prompt states")
        record = json.loads(path.with_suffix(".json").read_text())
        labels, key = record["labels"], record.get("pooled_key", "text_embeds")
        if key not in POOLED_KEYS:
            raise ErasekitError(f"cached soft-prompt states {path}: unknown pooled key {key!r}")
        pooled = tensors.get("pooled")
        return cls(dict(zip(labels, tensors["states"])), dict(zip(labels, pooled)) if pooled is not None else None, key)

"""Textual inversion: learn new token vectors that make a pipeline draw the concept of a set of images.

The learned vectors live in the text encoder's input-embedding space (one row per vector); the UNet, VAE and
text encoder stay frozen. Training is the usual denoising loss on the images' VAE latents, with prompts from
neutral templates around the new token ("a picture of a <star-ti>").

The pipeline is never modified: during training and when encoding prompts, a pair of hooks on the input
embedding layer replaces the rows of the new token ids by the learned vectors (ids beyond the vocabulary are
mapped to a valid id first, then their embeddings are swapped), so only the new vectors receive gradients and
every other embedding row stays exactly as it was. This works for any `nn.Embedding` input layer: CLIP
(SD-1.x/2.x) and BERT (the embedded world's MiniLM) alike. ``save`` writes ``learned_embeds.safetensors``
in diffusers' format ({token: (k, D)}), which ``pipe.load_textual_inversion(path)`` reads; multi-vector tokens
expand to ``<t> <t>_1 ... <t>_{k-1}`` as diffusers does.

SDXL: one token per text encoder, learned together (``vectors`` for CLIP-L, ``vectors_2`` for OpenCLIP-bigG), saved
as {"clip_l": (k, 768), "clip_g": (k, 1280)} (the token in the file's metadata and the JSON beside it), the format
diffusers' SDXL loading reads: ``pipe.load_textual_inversion(sd["clip_l"], token=t, text_encoder=pipe.text_encoder,
tokenizer=pipe.tokenizer)`` and the same with "clip_g", ``text_encoder_2`` and ``tokenizer_2``.

SD3 / FLUX.1: one token in each text encoder the family uses, T5 included (SD3: CLIP-L, CLIP-G, T5; FLUX.1: CLIP-L,
whose pooled output conditions, and T5), learned together on the flow-matching loss (the velocity target, as
diffusers' SD3 / FLUX DreamBooth scripts train: `erasekit.attacks.textual_inversion_loop`), saved as {"clip_l",
"clip_g", "t5"} / {"clip_l", "t5"} tensors with the token in the metadata (the keys of diffusers' advanced FLUX
script's embeddings file). The hooks sit on the embedding the encoder calls (T5's ``encoder.embed_tokens``).

Several tokens that learn on one model state (the bench's cells) are learned together, one batched step each, every
token with its own random stream and its own Adam: `learn_textual_inversions` (`textual_inversion_loop.py`), equal
to learning them one at a time up to batched kernels' rounding; cells on several edits of one base model (UCE, RECE,
ESD-x: denoiser Linear / Conv2d layers) too, each token's rows through its own edit's layers. The bench hands its
cells to ``TextualInversionAttack.prepare``, which does this on CUDA (``BATCH_CELLS``; on the CPU each cell learns
alone, so CPU results are unchanged), each token into the cache entry a cell learning alone would use.
The settings, the vectors' files and the embedding hooks are in `textual_inversion_embedding.py`.

On CUDA the training step runs under bf16 autocast (`erasekit.diffusion.speed.train_autocast`; weights stay as
loaded, the learned vectors float32); ``mixed_precision=no`` turns it off.

Black-box use: learn on the original model, generate with the erased one. White-box: learn on the erased one.
Defaults (the embedded world, 32x32 images on a 2-core CPU): 400 steps, batch 16, Adam lr 5e-3, one vector
initialised from the word "object" (Lu et al.'s initialiser), 4 of the 8 templates per step. Measured on the
trained world (scripts/bench_attacks.py, 2-core CPU): 85 s per token; the token draws stars in 99% of images
(the attacks-star bench preset, 100 images). On the earlier, under-trained weights it reached only the model's own star
rate (66%), and three times the budget did not raise it: the ceiling is the model's, not the optimiser's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erasekit.attacks.base import Attack, AttackContext, AttackInputs
from erasekit.attacks.textual_inversion_embedding import (  # noqa: F401  (the public names, imported from here)
    CONFIG_FILE, ENCODER_ORDER, GENERATION_TEMPLATE, LEARNED_EMBEDS_FILE, TEMPLATES_PER_STEP, TRAIN_TEMPLATES,
    LearnedEmbedding, TextualInversionConfig, tokenizer_with,
)
from erasekit.attacks.textual_inversion_loop import learn_textual_inversions
from erasekit.errors import ErasekitError
from erasekit.registry import ATTACKS


def learn_textual_inversion(pipe, images: np.ndarray, config: TextualInversionConfig | None = None,
                            progress: bool = True) -> LearnedEmbedding:
    """Learn ``config.num_vectors`` vectors for ``config.token`` from uint8 RGB images at the pipeline's size (the
    loop of `erasekit.attacks.textual_inversion_loop` with one token; several at once: `learn_textual_inversions`)."""
    return learn_textual_inversions(pipe, [(images, config or TextualInversionConfig())], progress=progress)[0]


def textual_inversion_inputs(learned: LearnedEmbedding, n: int, seed: int = 0,
                             template: str = GENERATION_TEMPLATE, learned_on: str = "") -> AttackInputs:
    """``n`` images of ``template`` with the learned token, seeds ``seed + i``."""

    if n < 1:
        raise ErasekitError(f"-n must be at least 1, got {n}")
    budget = dict(learned.budget, learned_on=learned_on, token=learned.token) if learned_on else dict(learned.budget)
    return AttackInputs(
        attack="textual_inversion",
        prompts=[learned.prompt(template)] * n,
        seeds=[seed + i for i in range(n)],
        learned=learned,
        budget=budget,
    )


RENDER_SEED = 1_000_000  # rendered concept images: far from generation seeds


def default_token(concept: str) -> str:
    import re

    return "<" + (re.sub(r"[^a-z0-9]+", "-", concept.lower()).strip("-") or "concept") + "-ti>"


@ATTACKS.register
class TextualInversionAttack(Attack):
    name = "textual_inversion"
    alias = "ti"
    summary = ("learn a new token's vectors from concept images (every text encoder of the family: CLIP, BERT, T5); "
               "diffusers format")
    Settings = TextualInversionConfig
    needs_unet = False  # the family's denoiser and loss: SD3 / FLUX.1 too (the flow-matching velocity)
    order = 1
    scenarios = {"embedding-bb": {"learn_on": "original"}, "embedding-wb": {"learn_on": "target"}}

    def _plan(self, ctx: AttackContext, learn_on: str) -> "_TokenPlan":
        """What the cell learns: its config (the default token named after the concept), learner, images, cache key.
        Made once per cell (`prepare` and `inputs` share it: the images' notes are not repeated)."""
        import dataclasses

        from erasekit.attacks.images import concept_images

        memo = getattr(self, "_plans", None)
        if memo is None:
            memo = self._plans = {}
        key = (id(ctx), learn_on)
        if key not in memo:
            config = self.settings
            if config.token == TextualInversionConfig.token:  # the default token: named after the concept
                config = dataclasses.replace(config, token=default_token(ctx.concept))
            learner = ctx.learner(learn_on)
            images = concept_images(learner, ctx.concept, None if ctx.images_folder else config.images,
                                    ctx.images_folder, RENDER_SEED, ctx.notes)
            source = {"images_digest": images.digest, "learner": learner.cache_id}
            memo[key] = _TokenPlan(config, learner, images, source, ctx)
        return memo[key]

    @classmethod
    def prepare(cls, items) -> None:
        """Learn together the tokens that the cells ``items`` ((attack, ctx, scenario arguments) each) are about
        to ask for and the cache lacks: one batched loop (`learn_textual_inversions`) per base model, each token
        saved to its own cache entry (the key a cell learning alone uses). Cells on one model state share its
        weights; cells on several edits of one base model (the original, UCE, RECE, ESD-x: edits of denoiser Linear
        / Conv2d layers) learn in one loop too, each token's rows through its own edit's layers (`RowWeights`);
        an edit of other layers (ESD-u's norms) keeps its state's own loop. A loop of one token is left to
        `inputs`, as are cells without a cache folder. Only where `batch_cells` says so (CUDA by default)."""
        from erasekit.cache import cache_entry

        groups: dict[tuple, list] = {}
        seen = set()
        for attack, ctx, args in items:
            if ctx.cache_dir is None:
                continue
            plan = attack._plan(ctx, **args)
            if not batch_cells(plan.learner.pipe):
                continue
            plan.entry = cache_entry(ctx.cache_dir, "ti", (plan.source, plan.config.as_dict()), suffix="")
            if plan.entry in seen or _complete(plan.entry):
                continue  # the first cell with this key learns it; later ones read it from the cache
            seen.add(plan.entry)
            plan.weights = _edit_weights(plan.learner)
            key = ("base", id(plan.learner.pipe), plan.learner.base_fingerprint) if plan.weights is not None else \
                ("state", id(plan.learner.pipe), plan.learner.cache_id)
            groups.setdefault(key, []).append((attack, plan))
        for group in groups.values():
            if len(group) >= 2:
                _learn_together([p for _, p in group])

    def inputs(self, ctx: AttackContext, learn_on: str) -> AttackInputs:
        """Learn (or reuse from the cache) the concept's token on the original or the attacked model."""
        from erasekit.cache import cached

        plan = self._plan(ctx, learn_on)
        if plan.learned is not None:  # learned together with other cells' tokens by `prepare`, this run
            learned = plan.learned
            return textual_inversion_inputs(learned, ctx.n, seed=ctx.seed, learned_on=learn_on)
        config, learner, images, source = plan.config, plan.learner, plan.images, plan.source

        def learn():
            with learner.active():
                learned = learn_textual_inversion(learner.pipe, images.images, config, progress=ctx.progress)
            learned.config.update(source)
            return learned

        # A folder in diffusers' layout; the vectors (written last) mark it done.
        learned, reused = cached(ctx.cache_dir, "ti", (source, config.as_dict()), learn, suffix="",
                                 load=LearnedEmbedding.load, save=lambda folder, emb: emb.save(folder),
                                 complete=_complete)
        if reused:
            learned.budget = dict(learned.budget, reused_from_cache=reused)
        return textual_inversion_inputs(learned, ctx.n, seed=ctx.seed, learned_on=learn_on)


# Cells' tokens learned together (`TextualInversionAttack.prepare`): "auto" on CUDA, where one token's batch leaves
# the GPU mostly idle; on the CPU each cell learns alone, so CPU results stay bit for bit what they were (batched
# kernels round differently). "on" / "off" force it.
BATCH_CELLS = "auto"


def batch_cells(pipe) -> bool:
    if BATCH_CELLS != "auto":
        return BATCH_CELLS == "on"
    from erasekit.diffusion.family import family_of

    return family_of(pipe).denoiser(pipe).device.type == "cuda"


def _learn_together(plans: list) -> None:
    """Learn ``plans``' tokens in one loop and save each to its cache entry; a loop the GPU has no memory for is
    split in halves (each token draws from its own generator: the split changes nothing but the rounding)."""
    import torch

    jobs = [(p.images.images, p.config) for p in plans]
    learner = plans[0].learner
    try:
        if len({p.learner.cache_id for p in plans}) == 1:  # one model state: its weights, as they are
            with learner.active():
                learned = learn_textual_inversions(learner.pipe, jobs, progress=plans[0].ctx.progress)
        else:  # several edits of one base model: the base weights, each token's rows through its own edit
            with learner.original().active():
                learned = learn_textual_inversions(learner.pipe, jobs, progress=plans[0].ctx.progress,
                                                   weights=[p.weights or None for p in plans])
    except torch.cuda.OutOfMemoryError:
        if len(plans) < 2:
            raise
        torch.cuda.empty_cache()
        half = len(plans) // 2
        for part in (plans[:half], plans[half:]):
            if len(part) > 1:
                _learn_together(part)  # a single token is left to `inputs`, as any loop of one
        return
    for plan, emb in zip(plans, learned):
        emb.config.update(plan.source)
        plan.entry.parent.mkdir(parents=True, exist_ok=True)
        emb.save(plan.entry)
        plan.learned = emb


def _edit_weights(learner) -> dict | None:
    """The denoiser tensors ``learner``'s edits set ({} without edits), when every one is a Linear / Conv2d weight
    `RowWeights` can serve; None otherwise."""
    from erasekit.attacks.textual_inversion_loop import row_weights_module

    values: dict = {}
    for edit in learner.edits:
        if not isinstance(getattr(edit, "tensors", None), dict):
            return None
        for name, value in edit.tensors.items():
            try:
                row_weights_module(learner.pipe, name)
            except ValueError:
                return None
            values[name] = value  # a later edit of the same tensor wins, as when applied in order
    return values


def _complete(folder) -> bool:
    """A cached token's folder is whole: its JSON and its vectors (written last) are there."""
    return (folder / CONFIG_FILE).is_file() and (folder / LEARNED_EMBEDS_FILE).is_file()


@dataclass
class _TokenPlan:
    config: TextualInversionConfig
    learner: Any
    images: Any
    source: dict
    ctx: AttackContext
    entry: Path | None = None
    learned: LearnedEmbedding | None = None
    weights: dict | None = None

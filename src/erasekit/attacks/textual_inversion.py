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

Black-box use: learn on the original model, generate with the erased one. White-box: learn on the erased one.
Defaults (the embedded world, 32x32 images on a 2-core CPU): 400 steps, batch 16, Adam lr 5e-3, one vector
initialised from the word "object" (Lu et al.'s initialiser), 4 of the 8 templates per step. Measured on the
trained world (scripts/bench_attacks.py, 2-core CPU): 85 s per token; the token draws stars in 99% of images
(scripts/eval_attacks.py, 100 images). On the earlier, under-trained weights it reached only the model's own star
rate (66%), and three times the budget did not raise it: the ceiling is the model's, not the optimiser's.
"""

from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from erasekit.attacks.base import Attack, AttackContext, AttackInputs
from erasekit.diffusion.conditioning import Conditioning
from erasekit.diffusion.guidance import UNetDenoiser
from erasekit.diffusion.vae import encode_distribution, image_size
from erasekit.errors import ErasekitError
from erasekit.models.prompts import encode_prompts
from erasekit.registry import ATTACKS
from erasekit.settings import Settings

LEARNED_EMBEDS_FILE = "learned_embeds.safetensors"
CONFIG_FILE = "textual_inversion.json"
TRAIN_TEMPLATES = (
    "a {}",
    "a picture of a {}",
    "a photo of a {}",
    "an image of a {}",
    "a rendering of a {}",
    "a close-up picture of a {}",
    "a small {}",
    "a large {}",
)
GENERATION_TEMPLATE = "a picture of a {}"
TEMPLATES_PER_STEP = 4


@dataclass
class TextualInversionConfig(Settings):
    token: str = "<concept-ti>"
    num_vectors: int = 1
    initializer: str = "object"
    steps: int = 400
    batch_size: int = 16
    lr: float = 5e-3
    seed: int = 0
    templates: tuple[str, ...] = TRAIN_TEMPLATES
    images: int = 32  # concept images to learn from when the world renders them (no --images folder)

    def validate(self) -> None:
        from erasekit.checks import finite, integer

        if not isinstance(self.token, str) or not self.token or any(ch.isspace() for ch in self.token):
            raise ErasekitError(f"the textual-inversion token must be one word without spaces, got {self.token!r}")
        if self.token != self.token.lower():
            # BERT tokenizers lower-case the prompt before matching added tokens.
            raise ErasekitError(f"use a lower-case textual-inversion token, got {self.token!r}")
        for name in ("num_vectors", "steps", "batch_size", "images"):
            value = getattr(self, name)
            if integer(f"textual inversion: {name}", value) < 1:  # a whole number (not nan, inf, 2.5, "x")
                raise ErasekitError(f"textual inversion: {name} must be at least 1, got {value}")
        integer("textual inversion: seed", self.seed, low=-(2**63), high=2**64 - 1)  # manual_seed's range
        lr = finite("textual inversion: lr", self.lr)  # nan, inf
        if not lr > 0:
            raise ErasekitError(f"textual inversion: lr must be positive, got {self.lr}")
        if lr > 1e3:
            raise ErasekitError(f"textual inversion: lr must be at most 1000, got {self.lr}")
        if not isinstance(self.initializer, str):
            raise ErasekitError(f"textual inversion: the initializer must be a word, got {self.initializer!r}")
        if isinstance(self.templates, str) or not self.templates or any(
                not isinstance(t, str) or "{}" not in t for t in self.templates):
            raise ErasekitError("textual inversion: every template needs a '{}' for the token")

    def tokens(self) -> list[str]:
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.num_vectors)]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["templates"] = list(self.templates)
        return d


@dataclass
class LearnedEmbedding:
    """Learned vectors (k, D) for ``token``; ``budget`` records what learning them cost."""

    token: str
    vectors: torch.Tensor
    budget: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        self.vectors = self.vectors.detach().to("cpu", torch.float32).reshape(-1, self.vectors.shape[-1])

    @property
    def tokens(self) -> list[str]:
        return [self.token] + [f"{self.token}_{i}" for i in range(1, len(self.vectors))]

    def prompt(self, template: str = GENERATION_TEMPLATE) -> str:
        return template.format(self.token)

    def expand(self, prompt: str) -> str:
        """``<t>`` -> ``<t> <t>_1 ...`` for multi-vector tokens, as diffusers' ``maybe_convert_prompt`` does."""
        return prompt.replace(self.token, " ".join(self.tokens)) if len(self.tokens) > 1 else prompt

    def digest(self) -> str:
        h = hashlib.sha256(self.token.encode())
        h.update(self.vectors.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        return h.hexdigest()[:16]

    # -- files ----------------------------------------------------------------------------------
    def save(self, out_dir) -> Path:
        """``learned_embeds.safetensors`` (diffusers' format) and ``textual_inversion.json`` (config, budget)."""
        from erasekit.atomic import atomic_save_safetensors, atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / LEARNED_EMBEDS_FILE
        record = {"token": self.token, "tokens": self.tokens, "shape": list(self.vectors.shape),
                  "digest": self.digest(), "config": self.config, "budget": self.budget}
        # Each file whole or absent; the vectors (whose presence marks a cached embedding as done) last.
        atomic_write_text(out / CONFIG_FILE, json.dumps(record, indent=2) + "\n")
        atomic_save_safetensors({self.token: self.vectors.contiguous()}, path)
        return path

    @classmethod
    def load(cls, path) -> "LearnedEmbedding":
        """Read a diffusers-format file (or a folder holding one); the JSON beside it, when present, too."""
        from erasekit.safe_load import load_safetensors

        path = Path(path)
        if path.is_dir():
            path = path / LEARNED_EMBEDS_FILE
        if not path.is_file():
            raise ErasekitError(f"{path}: no such learned-embedding file")
        state = load_safetensors(path, "learned-embedding file")
        if len(state) != 1:
            raise ErasekitError(f"{path} should hold one token's vectors, holds {len(state)} tensors")
        (token, vectors), = state.items()
        if not token or any(ch.isspace() for ch in token):
            raise ErasekitError(f"{path}: the token {token!r} is not one word")
        if vectors.ndim not in (1, 2) or vectors.numel() == 0 or not vectors.is_floating_point():
            raise ErasekitError(f"{path}: the vectors of {token!r} must be a non-empty float (k, D) tensor, "
                                f"got {str(vectors.dtype).replace('torch.', '')} {tuple(vectors.shape)}")
        if not bool(torch.isfinite(vectors).all()):
            raise ErasekitError(f"{path}: the vectors of {token!r} hold NaN or infinite values")
        meta_path = path.parent / CONFIG_FILE
        meta = {}
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
                raise ErasekitError(f"corrupt {meta_path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
            if not isinstance(meta, dict):
                raise ErasekitError(f"corrupt {meta_path}: not a JSON object")
        budget, config = meta.get("budget", {}), meta.get("config", {})
        return cls(token, vectors, budget=budget if isinstance(budget, dict) else {},
                   config=config if isinstance(config, dict) else {})

    # -- using ----------------------------------------------------------------------------------
    def encode(self, pipe, prompts, device=None) -> torch.Tensor:
        """Text states (B, T, D) of ``prompts`` (which may use the token) on ``pipe``, the pipeline untouched;
        equal to ``encode_prompts`` after ``pipe.load_textual_inversion`` of the saved file."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tok = tokenizer_with(pipe.tokenizer, self.tokens)
        with torch.no_grad(), _swap_new_rows(pipe.text_encoder, len(pipe.tokenizer), self.vectors):
            states = encode_prompts(pipe, [self.expand(p) for p in prompts], tokenizer=tok)
        return states.to(device) if device is not None else states


def tokenizer_with(tokenizer, tokens: list[str]):
    """A copy of ``tokenizer`` with ``tokens`` added (in order, so their ids are len(tokenizer) + i)."""
    vocab = tokenizer.get_vocab()
    clash = [t for t in tokens if t in vocab]
    if clash:
        raise ErasekitError(f"the token {clash[0]!r} is already in the tokenizer's vocabulary; choose another")
    tok = copy.deepcopy(tokenizer)
    n = len(tok)
    tok.add_tokens(tokens)
    ids = tok.convert_tokens_to_ids(tokens)
    if ids != list(range(n, n + len(tokens))):
        raise ErasekitError(f"cannot add the tokens {tokens} to the tokenizer ({type(tokenizer).__name__})")
    probe = tok(f"x {' '.join(tokens)} x", add_special_tokens=False).input_ids
    if not all(i in probe for i in ids):
        raise ErasekitError(f"the tokenizer splits the token {tokens[0]!r}; choose a simpler one like '<star-ti>'")
    return tok


@contextmanager
def _swap_new_rows(text_encoder, vocab_size: int, vectors: torch.Tensor):
    """While active, ids >= ``vocab_size`` embed to ``vectors[id - vocab_size]`` (gradients flow to ``vectors``)."""
    embedding = text_encoder.get_input_embeddings()
    if vectors.shape[-1] != embedding.embedding_dim:
        raise ErasekitError(f"learned vectors have width {vectors.shape[-1]}, this text encoder's embeddings "
                            f"{embedding.embedding_dim}: they were learned on another text encoder")
    state = {}

    def pre(module, args):
        ids = args[0]
        new = ids >= vocab_size
        state["new"], state["which"] = new, (ids - vocab_size).clamp(min=0)
        return (ids.masked_fill(new, 0),) + tuple(args[1:])

    def post(module, args, output):
        new = state.pop("new")
        if not new.any():
            return output
        rows = vectors.to(device=output.device, dtype=output.dtype)[state.pop("which")]
        return torch.where(new.unsqueeze(-1), rows, output)

    handles = [embedding.register_forward_pre_hook(pre), embedding.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _frozen(*modules):
    """No parameter of ``modules`` requires grad inside (restored after): only the new vectors are trained."""
    saved = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _initial_vectors(pipe, word: str, k: int) -> torch.Tensor:
    ids = pipe.tokenizer(word, add_special_tokens=False).input_ids if word else []
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    if not ids:
        raise ErasekitError(f"the initialiser {word!r} gives no tokens on this tokenizer; choose a word")
    return table[ids].float().mean(0, keepdim=True).repeat(k, 1).clone()


def learn_textual_inversion(pipe, images: np.ndarray, config: TextualInversionConfig | None = None,
                            progress: bool = True) -> LearnedEmbedding:
    """Learn ``config.num_vectors`` vectors for ``config.token`` from uint8 RGB images at the pipeline's size."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from erasekit.metrics.cost import measure_cost

    config = config or TextualInversionConfig()
    config.validate()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ErasekitError(f"textual inversion needs uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}")
    if tuple(images.shape[1:3]) != image_size(pipe):
        raise ErasekitError(f"images are {images.shape[2]}x{images.shape[1]}, the pipeline makes "
                            f"{image_size(pipe)[1]}x{image_size(pipe)[0]}: resize them first (load_image_folder does)")
    tokens = config.tokens()
    tok = tokenizer_with(pipe.tokenizer, tokens)
    vocab_size = len(pipe.tokenizer)
    unet, device = pipe.unet, pipe.unet.device
    model = UNetDenoiser(unet)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_scheduler.config.prediction_type
    n_train = noise_scheduler.config.num_train_timesteps
    scale = float(pipe.vae.config.scaling_factor)
    gen = torch.Generator("cpu").manual_seed(int(config.seed))
    placeholder = " ".join(tokens)
    prompts_all = [t.format(placeholder) for t in config.templates]
    losses = []

    with measure_cost() as cost, _frozen(pipe.unet, pipe.text_encoder, pipe.vae):
        mean, std = encode_distribution(pipe, images)
        vectors = _initial_vectors(pipe, config.initializer, len(tokens)).to(pipe.text_encoder.device)
        vectors.requires_grad_(True)
        optimizer = torch.optim.Adam([vectors], lr=config.lr)
        bs = int(config.batch_size)
        with _swap_new_rows(pipe.text_encoder, vocab_size, vectors):
            for _ in tqdm(range(config.steps), desc="textual inversion", unit="step", disable=not progress, leave=False):
                idx = torch.randint(len(images), (bs,), generator=gen)
                eps_vae = torch.randn(mean[idx].shape, generator=gen).to(device)
                latents = (mean[idx] + std[idx] * eps_vae) * scale
                noise = torch.randn(latents.shape, generator=gen).to(device)
                t = torch.randint(n_train, (bs,), generator=gen).to(device)
                noisy = noise_scheduler.add_noise(latents, noise, t)
                # A few templates per step, each encoded once and shared by several images: the text encoder
                # costs as much as the UNet on small models.
                uniq = torch.randperm(len(prompts_all), generator=gen)[: min(TEMPLATES_PER_STEP, bs)]
                states = encode_prompts(pipe, [prompts_all[i] for i in uniq.tolist()], tokenizer=tok)
                states = states[torch.arange(bs, device=states.device) % len(uniq)]
                pred = model(noisy, t, Conditioning(states)).float()
                target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
                loss = torch.nn.functional.mse_loss(pred, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        cost.add_images(0)
    k = max(1, len(losses) // 10)
    budget = {
        "optimisation_steps": config.steps,
        "batch_size": config.batch_size,
        "images_used": int(len(images)),
        "unet_evaluations": config.steps * config.batch_size,
        "loss_first": round(float(np.mean(losses[:k])), 5),
        "loss_last": round(float(np.mean(losses[-k:])), 5),
        **{key: v for key, v in cost.as_dict().items() if key != "images"},
    }
    budget["seconds_per_token"] = budget["wall_s"]  # one run learns one token (of num_vectors vectors)
    return LearnedEmbedding(config.token, vectors.detach(), budget=budget, config=config.as_dict())


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
    summary = "learn a new token's vectors from concept images (CLIP or BERT encoders); diffusers format"
    Settings = TextualInversionConfig
    order = 1
    scenarios = {"embedding-bb": {"learn_on": "original"}, "embedding-wb": {"learn_on": "target"}}

    def inputs(self, ctx: AttackContext, learn_on: str) -> AttackInputs:
        """Learn (or reuse from the cache) the concept's token on the original or the attacked model."""
        import dataclasses

        from erasekit.attacks.images import concept_images
        from erasekit.store import content_key

        config = self.settings
        if config.token == TextualInversionConfig.token:  # the default token: named after the concept
            config = dataclasses.replace(config, token=default_token(ctx.concept))
        learner = ctx.learner(learn_on)
        images = concept_images(learner, ctx.concept, None if ctx.images_folder else config.images, ctx.images_folder,
                                RENDER_SEED, ctx.notes)
        source = {"images_digest": images.digest, "learner": learner.cache_id}
        folder = ctx.cache_dir / f"ti-{content_key(source, config.as_dict())}" if ctx.cache_dir is not None else None
        if folder is not None and (folder / CONFIG_FILE).is_file() and (folder / LEARNED_EMBEDS_FILE).is_file():
            learned = LearnedEmbedding.load(folder)
            learned.budget = dict(learned.budget, reused_from_cache=str(folder))
        else:
            with learner.active():
                learned = learn_textual_inversion(learner.pipe, images.images, config, progress=ctx.progress)
            learned.config.update(source)
            if folder is not None:
                learned.save(folder)
        return textual_inversion_inputs(learned, ctx.n, seed=ctx.seed, learned_on=learn_on)

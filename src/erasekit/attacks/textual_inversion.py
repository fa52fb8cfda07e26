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

import contextlib
import copy
import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from erasekit.attacks.base import Attack, AttackContext, AttackInputs
from erasekit.attacks.common import frozen
from erasekit.diffusion.guidance import UNetDenoiser
from erasekit.diffusion.vae import encode_distribution, image_size
from erasekit.errors import ErasekitError
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
    mixed_precision: str = "auto"  # auto: bf16 autocast on CUDA, none on the CPU; "no": never

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
        if self.mixed_precision not in ("auto", "no"):
            raise ErasekitError(f"textual inversion: mixed_precision is 'auto' or 'no', got {self.mixed_precision!r}")
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
    """Learned vectors (k, D) for ``token``; ``budget`` records what learning them cost. SDXL: ``vectors`` for the
    first text encoder (CLIP-L), ``vectors_2`` (k, D2) for the second (OpenCLIP-bigG)."""

    token: str
    vectors: torch.Tensor
    budget: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    vectors_2: torch.Tensor | None = None

    def __post_init__(self):
        self.vectors = self.vectors.detach().to("cpu", torch.float32).reshape(-1, self.vectors.shape[-1])
        if self.vectors_2 is not None:
            self.vectors_2 = self.vectors_2.detach().to("cpu", torch.float32).reshape(-1, self.vectors_2.shape[-1])
            if len(self.vectors_2) != len(self.vectors):
                raise ErasekitError(f"SDXL learned embedding: {len(self.vectors)} clip_l vectors but "
                                    f"{len(self.vectors_2)} clip_g vectors")

    def per_encoder(self) -> list[torch.Tensor]:
        return [self.vectors] + ([self.vectors_2] if self.vectors_2 is not None else [])

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
        for v in self.per_encoder():
            h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().data)
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
        if self.vectors_2 is not None:  # diffusers' SDXL format: one tensor per text encoder, the token beside
            record["shape_2"] = list(self.vectors_2.shape)
            atomic_write_text(out / CONFIG_FILE, json.dumps(record, indent=2) + "\n")
            atomic_save_safetensors({"clip_l": self.vectors.contiguous(), "clip_g": self.vectors_2.contiguous()}, path,
                                    metadata={"token": self.token})
            return path
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
        sdxl = set(state) == {"clip_l", "clip_g"}
        if len(state) != 1 and not sdxl:
            raise ErasekitError(f"{path} should hold one token's vectors (or SDXL's clip_l and clip_g), holds "
                                f"{len(state)} tensors")
        if sdxl:
            token = _sdxl_token(path)
            vectors, vectors_2 = state["clip_l"], state["clip_g"]
        else:
            (token, vectors), = state.items()
            vectors_2 = None
        if not token or any(ch.isspace() for ch in token):
            raise ErasekitError(f"{path}: the token {token!r} is not one word")
        for v in (vectors, vectors_2):
            if v is None:
                continue
            if v.ndim not in (1, 2) or v.numel() == 0 or not v.is_floating_point():
                raise ErasekitError(f"{path}: the vectors of {token!r} must be a non-empty float (k, D) tensor, "
                                    f"got {str(v.dtype).replace('torch.', '')} {tuple(v.shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ErasekitError(f"{path}: the vectors of {token!r} hold NaN or infinite values")
        if vectors_2 is not None and vectors.reshape(-1, vectors.shape[-1]).shape[0] != \
                vectors_2.reshape(-1, vectors_2.shape[-1]).shape[0]:
            raise ErasekitError(f"{path}: clip_l and clip_g hold different numbers of vectors")
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
                   config=config if isinstance(config, dict) else {}, vectors_2=vectors_2)

    # -- using ----------------------------------------------------------------------------------
    def encode(self, pipe, prompts, device=None):
        """Text states (B, T, D) of ``prompts`` (which may use the token) on ``pipe``, the pipeline untouched;
        equal to ``encode_prompts`` after ``pipe.load_textual_inversion`` of the saved file. SDXL: a `Conditioning`
        (states of both encoders with the pooled embedding), equal to the pipeline's ``encode_prompt`` after loading
        both tokens."""
        from erasekit.diffusion.family import family_of

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        family = family_of(pipe)
        encoders = family.encoders(pipe)
        vectors = self.per_encoder()
        if len(vectors) != len(encoders):
            raise ErasekitError(f"this learned embedding has vectors for {len(vectors)} text encoder(s), the pipeline "
                                f"has {len(encoders)}: it was learned on another kind of model")
        toks = [tokenizer_with(tok, self.tokens) for _, tok, _ in encoders]
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for (_, tok, enc), v in zip(encoders, vectors):
                stack.enter_context(_swap_new_rows(enc, len(tok), v))
            cond = family.encode(pipe, [self.expand(p) for p in prompts], tokenizers=toks)
        if len(encoders) == 1:
            return cond.states.to(device) if device is not None else cond.states
        return cond.to(device) if device is not None else cond


def _sdxl_token(path: Path) -> str:
    """The token of an SDXL learned-embedding file: its metadata, else the JSON beside it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            token = (f.metadata() or {}).get("token")
    except Exception:
        token = None
    if not token and (path.parent / CONFIG_FILE).is_file():
        try:
            token = json.loads((path.parent / CONFIG_FILE).read_text(encoding="utf-8")).get("token")
        except (OSError, ValueError, AttributeError):
            token = None
    if not isinstance(token, str) or not token:
        raise ErasekitError(f"{path}: an SDXL embedding (clip_l, clip_g) without its token: erasekit writes it in the "
                            f"file's metadata and {CONFIG_FILE}; add {CONFIG_FILE} with {{\"token\": \"<name>\"}}")
    return token


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


def _initial_vectors(pipe, word: str, k: int, tokenizer=None, text_encoder=None) -> torch.Tensor:
    tokenizer = tokenizer if tokenizer is not None else pipe.tokenizer
    text_encoder = text_encoder if text_encoder is not None else pipe.text_encoder
    ids = tokenizer(word, add_special_tokens=False).input_ids if word else []
    table = text_encoder.get_input_embeddings().weight.detach()
    if not ids:
        raise ErasekitError(f"the initialiser {word!r} gives no tokens on this tokenizer; choose a word")
    return table[ids].float().mean(0, keepdim=True).repeat(k, 1).clone()


def learn_textual_inversion(pipe, images: np.ndarray, config: TextualInversionConfig | None = None,
                            progress: bool = True) -> LearnedEmbedding:
    """Learn ``config.num_vectors`` vectors for ``config.token`` from uint8 RGB images at the pipeline's size."""
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
    from erasekit.diffusion.family import family_of
    from erasekit.diffusion.speed import train_autocast
    from erasekit.diffusion.transfer import to_device

    tokens = config.tokens()
    family = family_of(pipe)
    encoders = family.encoders(pipe)
    toks = [tokenizer_with(tk, tokens) for _, tk, _ in encoders]
    unet, device = pipe.unet, pipe.unet.device
    autocast = train_autocast(device) if config.mixed_precision == "auto" else contextlib.nullcontext()
    model = UNetDenoiser(unet, family)
    schedule = family.schedule(pipe)
    n_train = schedule.num_train_timesteps
    scale = float(pipe.vae.config.scaling_factor)
    gen = torch.Generator("cpu").manual_seed(int(config.seed))
    placeholder = " ".join(tokens)
    prompts_all = [t.format(placeholder) for t in config.templates]
    losses = []

    with measure_cost() as cost, frozen(pipe.unet, pipe.vae, *[enc for _, _, enc in encoders]), \
            contextlib.ExitStack() as swaps:
        mean, std = encode_distribution(pipe, images)
        all_vectors = []
        for _, tk, enc in encoders:
            v = _initial_vectors(pipe, config.initializer, len(tokens), tk, enc).to(enc.device)
            v.requires_grad_(True)
            all_vectors.append(v)
            swaps.enter_context(_swap_new_rows(enc, len(tk), v))
        optimizer = torch.optim.Adam(all_vectors, lr=config.lr)
        bs = int(config.batch_size)
        for _ in tqdm(range(config.steps), desc="textual inversion", unit="step", disable=not progress, leave=False):
            # Drawn on the host from the seeded generator (results do not depend on the device), copied without
            # a stream sync, so the GPU never waits for the next step's launches.
            idx = to_device(torch.randint(len(images), (bs,), generator=gen), mean.device)
            eps_vae = to_device(torch.randn(mean[idx].shape, generator=gen), device)
            latents = (mean[idx] + std[idx] * eps_vae) * scale
            noise = to_device(torch.randn(latents.shape, generator=gen), device)
            t = to_device(torch.randint(n_train, (bs,), generator=gen), device)
            noisy = schedule.add_noise(latents, noise, t)
            # A few templates per step, each encoded once and shared by several images: the text encoder
            # costs as much as the UNet on small models.
            uniq = torch.randperm(len(prompts_all), generator=gen)[: min(TEMPLATES_PER_STEP, bs)]
            with autocast:
                cond = family.encode(pipe, [prompts_all[i] for i in uniq.tolist()], tokenizers=toks)
                cond = cond[torch.arange(bs, device=cond.states.device) % len(uniq)]
                pred = model(noisy, t, cond).float()
            target = schedule.target(latents, noise, t)
            loss = torch.nn.functional.mse_loss(pred, target.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())  # read once at the end: .item() per step would wait for the GPU
        losses = torch.stack(losses).tolist()
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
    budget["mixed_precision"] = "bf16" if (config.mixed_precision == "auto" and device.type == "cuda") else "no"
    return LearnedEmbedding(config.token, all_vectors[0].detach(), budget=budget, config=config.as_dict(),
                            vectors_2=all_vectors[1].detach() if len(all_vectors) > 1 else None)


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
        from erasekit.cache import cached

        config = self.settings
        if config.token == TextualInversionConfig.token:  # the default token: named after the concept
            config = dataclasses.replace(config, token=default_token(ctx.concept))
        learner = ctx.learner(learn_on)
        images = concept_images(learner, ctx.concept, None if ctx.images_folder else config.images, ctx.images_folder,
                                RENDER_SEED, ctx.notes)
        source = {"images_digest": images.digest, "learner": learner.cache_id}

        def learn():
            with learner.active():
                learned = learn_textual_inversion(learner.pipe, images.images, config, progress=ctx.progress)
            learned.config.update(source)
            return learned

        # A folder in diffusers' layout; the vectors (written last) mark it done.
        learned, reused = cached(ctx.cache_dir, "ti", (source, config.as_dict()), learn, suffix="",
                                 load=LearnedEmbedding.load, save=lambda folder, emb: emb.save(folder),
                                 complete=lambda f: (f / CONFIG_FILE).is_file() and (f / LEARNED_EMBEDS_FILE).is_file())
        if reused:
            learned.budget = dict(learned.budget, reused_from_cache=reused)
        return textual_inversion_inputs(learned, ctx.n, seed=ctx.seed, learned_on=learn_on)

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
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from erasekit.errors import ErasekitError

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
class TextualInversionConfig:
    token: str = "<concept-ti>"
    num_vectors: int = 1
    initializer: str = "object"
    steps: int = 400
    batch_size: int = 16
    lr: float = 5e-3
    seed: int = 0
    templates: tuple[str, ...] = TRAIN_TEMPLATES

    def validate(self) -> None:
        if not self.token or any(ch.isspace() for ch in self.token):
            raise ErasekitError(f"the textual-inversion token must be one word without spaces, got {self.token!r}")
        if self.token != self.token.lower():
            # BERT tokenizers lower-case the prompt before matching added tokens.
            raise ErasekitError(f"use a lower-case textual-inversion token, got {self.token!r}")
        for name in ("num_vectors", "steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ErasekitError(f"textual inversion: {name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ErasekitError(f"textual inversion: lr must be positive, got {self.lr}")
        if not self.templates or any("{}" not in t for t in self.templates):
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
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / LEARNED_EMBEDS_FILE
        save_file({self.token: self.vectors.contiguous()}, str(path))
        record = {"token": self.token, "tokens": self.tokens, "shape": list(self.vectors.shape),
                  "digest": self.digest(), "config": self.config, "budget": self.budget}
        (out / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "LearnedEmbedding":
        """Read a diffusers-format file (or a folder holding one); the JSON beside it, when present, too."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_dir():
            path = path / LEARNED_EMBEDS_FILE
        if not path.is_file():
            raise ErasekitError(f"{path}: no such learned-embedding file")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ErasekitError(f"corrupt {path}: {exc}") from exc
        if len(state) != 1:
            raise ErasekitError(f"{path} should hold one token's vectors, holds {len(state)} tensors")
        (token, vectors), = state.items()
        meta_path = path.parent / CONFIG_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return cls(token, vectors, budget=meta.get("budget", {}), config=meta.get("config", {}))

    # -- using ----------------------------------------------------------------------------------
    def encode(self, pipe, prompts, device=None) -> torch.Tensor:
        """Text states (B, T, D) of ``prompts`` (which may use the token) on ``pipe``, the pipeline untouched;
        equal to ``encode_prompts`` after ``pipe.load_textual_inversion`` of the saved file."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tok = tokenizer_with(pipe.tokenizer, self.tokens)
        with torch.no_grad(), _swap_new_rows(pipe.text_encoder, len(pipe.tokenizer), self.vectors):
            states = _encode(pipe, tok, [self.expand(p) for p in prompts])
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


def _encode(pipe, tokenizer, prompts: list[str]) -> torch.Tensor:
    # As StableDiffusionPipeline.encode_prompt (and erasekit.models.encode_prompts) do it.
    encoder = pipe.text_encoder
    inputs = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
    mask = inputs.attention_mask.to(encoder.device) if use_mask else None
    return encoder(inputs.input_ids.to(encoder.device), attention_mask=mask)[0]


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


def encode_latent_distribution(pipe, images: np.ndarray, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (N, C, h, w), float32 on the UNet's device, of the VAE posterior of uint8 images, unscaled."""
    vae = pipe.vae
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2)
            x = (x.float() / 127.5 - 1.0).to(device=vae.device, dtype=vae.dtype)
            dist = vae.encode(x).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    return torch.cat(means).to(pipe.unet.device), torch.cat(stds).to(pipe.unet.device)


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

    from erasekit.generation import image_size
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
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_scheduler.config.prediction_type
    n_train = noise_scheduler.config.num_train_timesteps
    scale = float(pipe.vae.config.scaling_factor)
    gen = torch.Generator("cpu").manual_seed(int(config.seed))
    placeholder = " ".join(tokens)
    prompts_all = [t.format(placeholder) for t in config.templates]
    losses = []

    with measure_cost() as cost, _frozen(pipe.unet, pipe.text_encoder, pipe.vae):
        mean, std = encode_latent_distribution(pipe, images)
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
                states = _encode(pipe, tok, [prompts_all[i] for i in uniq.tolist()])
                states = states[torch.arange(bs, device=states.device) % len(uniq)]
                pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=states.to(unet.dtype)).sample.float()
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
                             template: str = GENERATION_TEMPLATE, learned_on: str = "") -> "AttackInputs":
    """``n`` images of ``template`` with the learned token, seeds ``seed + i``."""
    from erasekit.attacks.base import AttackInputs

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

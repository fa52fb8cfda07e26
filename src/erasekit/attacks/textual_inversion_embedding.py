"""Textual inversion's tokens: the settings, the learned vectors (files in diffusers' format) and the hooks that put
new token rows into a text encoder without changing it (`erasekit.attacks.textual_inversion` has the whole story;
`erasekit.attacks.textual_inversion_loop` learns them)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from erasekit.errors import ErasekitError
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


ENCODER_ORDER = ("clip_l", "clip_g", "t5")  # keys of multi-encoder files, in the families' encoder order


@dataclass
class LearnedEmbedding:
    """Learned vectors (k, D) for ``token``; ``budget`` records what learning them cost. Several text encoders (SDXL:
    CLIP-L + OpenCLIP-bigG; SD3: CLIP-L, CLIP-G, T5; FLUX.1: CLIP-L, T5): ``vectors`` for the first, ``vectors_2``
    and ``vectors_3`` for the next, ``encoders`` their names (the family's, the keys of the saved file; empty: one
    encoder, or SDXL's clip_l / clip_g)."""

    token: str
    vectors: torch.Tensor
    budget: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    vectors_2: torch.Tensor | None = None
    vectors_3: torch.Tensor | None = None
    encoders: tuple[str, ...] = ()

    def __post_init__(self):
        self.vectors = self.vectors.detach().to("cpu", torch.float32).reshape(-1, self.vectors.shape[-1])
        for name in ("vectors_2", "vectors_3"):
            v = getattr(self, name)
            if v is None:
                continue
            setattr(self, name, v.detach().to("cpu", torch.float32).reshape(-1, v.shape[-1]))
            if len(getattr(self, name)) != len(self.vectors):
                raise ErasekitError(f"learned embedding: {len(self.vectors)} vectors for the first text encoder but "
                                    f"{len(getattr(self, name))} for another")
        if self.vectors_3 is not None and self.vectors_2 is None:
            raise ErasekitError("learned embedding: vectors_3 without vectors_2")
        self.encoders = tuple(self.encoders)
        if self.encoders and len(self.encoders) != len(self.per_encoder()):
            raise ErasekitError(f"learned embedding: {len(self.per_encoder())} sets of vectors for the encoders "
                                f"{list(self.encoders)}")

    @classmethod
    def from_parts(cls, token: str, parts, names, budget=None, config=None) -> "LearnedEmbedding":
        """From one (k, D) tensor per text encoder, ``names`` the family's encoder names (`SDFamily.encoders`)."""
        parts, names = list(parts), tuple(names)
        if len(parts) == 1:
            return cls(token, parts[0], budget=budget or {}, config=config or {})
        return cls(token, parts[0], budget=budget or {}, config=config or {}, vectors_2=parts[1],
                   vectors_3=parts[2] if len(parts) > 2 else None, encoders=names)

    def per_encoder(self) -> list[torch.Tensor]:
        return [v for v in (self.vectors, self.vectors_2, self.vectors_3) if v is not None]

    def encoder_names(self) -> tuple[str, ...]:
        """The keys of the saved file (one encoder: the token itself)."""
        if len(self.per_encoder()) == 1:
            return (self.token,)
        return self.encoders or ENCODER_ORDER[: len(self.per_encoder())]

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
            if self.vectors_3 is not None:
                record["shape_3"] = list(self.vectors_3.shape)
            if self.encoders:
                record["encoders"] = list(self.encoders)
            atomic_write_text(out / CONFIG_FILE, json.dumps(record, indent=2) + "\n")
            atomic_save_safetensors({k: v.contiguous() for k, v in zip(self.encoder_names(), self.per_encoder())},
                                    path, metadata={"token": self.token})
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
        keys = set(state)
        multi = keys in MULTI_ENCODER_FILES
        if len(state) != 1 and not multi:
            raise ErasekitError(f"{path} should hold one token's vectors (or one tensor per text encoder: SDXL's "
                                f"clip_l and clip_g, SD3's clip_l, clip_g and t5, FLUX.1's clip_l and t5), holds "
                                f"{len(state)} tensors")
        encoders: tuple[str, ...] = ()
        if multi:
            token = _multi_token(path, keys)
            names = [k for k in ENCODER_ORDER if k in keys]
            parts = [state[k] for k in names]
            encoders = tuple(names) if keys != {"clip_l", "clip_g"} else ()
        else:
            (token, vectors), = state.items()
            parts = [vectors]
        if not token or any(ch.isspace() for ch in token):
            raise ErasekitError(f"{path}: the token {token!r} is not one word")
        for v in parts:
            if v is None:
                continue
            if v.ndim not in (1, 2) or v.numel() == 0 or not v.is_floating_point():
                raise ErasekitError(f"{path}: the vectors of {token!r} must be a non-empty float (k, D) tensor, "
                                    f"got {str(v.dtype).replace('torch.', '')} {tuple(v.shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ErasekitError(f"{path}: the vectors of {token!r} hold NaN or infinite values")
        counts = {v.reshape(-1, v.shape[-1]).shape[0] for v in parts}
        if len(counts) > 1:
            raise ErasekitError(f"{path}: {' and '.join(encoders or ('clip_l', 'clip_g'))} hold different numbers "
                                f"of vectors")
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
        return cls(token, parts[0], budget=budget if isinstance(budget, dict) else {},
                   config=config if isinstance(config, dict) else {}, vectors_2=parts[1] if len(parts) > 1 else None,
                   vectors_3=parts[2] if len(parts) > 2 else None, encoders=encoders)

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
        if len(vectors) != len(encoders) or (self.encoders and self.encoders != tuple(n for n, _, _ in encoders)):
            raise ErasekitError(f"this learned embedding has vectors for {list(self.encoders) or len(vectors)} text "
                                f"encoder(s), the pipeline has {[n for n, _, _ in encoders]}: it was learned on "
                                f"another kind of model")
        toks = [tokenizer_with(tok, self.tokens) for _, tok, _ in encoders]
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for (_, tok, enc), v in zip(encoders, vectors):
                stack.enter_context(_swap_new_rows(enc, len(tok), v))
            cond = family.encode(pipe, [self.expand(p) for p in prompts], tokenizers=toks)
        if len(encoders) == 1:
            return cond.states.to(device) if device is not None else cond.states
        return cond.to(device) if device is not None else cond


MULTI_ENCODER_FILES = ({"clip_l", "clip_g"}, {"clip_l", "clip_g", "t5"}, {"clip_l", "t5"})  # SDXL, SD3, FLUX.1


def _multi_token(path: Path, keys) -> str:
    """The token of a file with one tensor per text encoder: its metadata, else the JSON beside it."""
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
        what = "an SDXL embedding" if set(keys) == {"clip_l", "clip_g"} else "a multi-encoder embedding"
        raise ErasekitError(f"{path}: {what} ({', '.join(k for k in ENCODER_ORDER if k in keys)}) without its token: "
                            f"erasekit writes it in the file's metadata and {CONFIG_FILE}; add {CONFIG_FILE} with "
                            f"{{\"token\": \"<name>\"}}")
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


def input_embedding(text_encoder):
    """The embedding module the encoder calls on its ids: T5's stack has its own ``embed_tokens`` (its weight tied
    to ``shared``, what ``get_input_embeddings`` returns), so hooks go there."""
    stack = getattr(text_encoder, "encoder", None)
    module = getattr(stack, "embed_tokens", None) if stack is not None else None
    return module if isinstance(module, torch.nn.Embedding) else text_encoder.get_input_embeddings()


@contextmanager
def _swap_new_rows(text_encoder, vocab_size: int, vectors):
    """While active, ids >= ``vocab_size`` embed to ``vectors[id - vocab_size]`` (gradients flow to ``vectors``).
    ``vectors``: a (n, D) tensor, or a list of them (several tokens' rows in order, joined at each forward so that
    in-place optimiser updates are seen)."""
    embedding = input_embedding(text_encoder)
    parts = list(vectors) if isinstance(vectors, (list, tuple)) else None
    width = parts[0].shape[-1] if parts is not None else vectors.shape[-1]
    if parts is not None and any(p.shape[-1] != width for p in parts):
        raise ErasekitError("learned vectors of different widths for one text encoder")
    if width != embedding.embedding_dim:
        raise ErasekitError(f"learned vectors have width {width}, this text encoder's embeddings "
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
        table = (parts[0] if len(parts) == 1 else torch.cat(parts)) if parts is not None else vectors
        rows = table.to(device=output.device, dtype=output.dtype)[state.pop("which")]
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

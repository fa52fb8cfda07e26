"""What UnlearnDiffAtk and P4D share to attack many prompts in one batched loop with the result each prompt gets
when it is attacked alone.

- `prompt_generators`: one random stream per prompt, seeded from (the attack's seed, the prompt, its image seed),
  so that a prompt's noise, timesteps and sampled tokens do not depend on which prompts share its batch. The
  optimiser is one Adam over the batch's (B, ...) tensor: Adam is elementwise and every row takes the same steps,
  so each row follows its own trajectory (rows that stop are sliced out with their state); each row's loss is its
  own (the sum of per-prompt losses is minimised). What remains is float rounding of batched against single
  matmuls (about 1e-7 relative in float32), which can flip a sampled or nearest token only at a near tie.
- `prefix_vocabulary`: the candidate tokens as ids of every text encoder of the family: whole words that are one
  token in each tokenizer (the CLIP BPE of SD / SDXL / SD3 / FLUX, T5's SentencePiece pieces on SD3 and FLUX), so
  one relaxed one-hot drives every encoder and the decoded words type back to the same tokens.
- `DenoisingLoss`: the attacked model's denoising loss through the family (UNet: epsilon or v target at DDPM's
  integer timesteps; SD3 / FLUX: the flow-matching velocity ``eps - x0`` at ``x_s = (1 - s) x0 + s eps``,
  s = t / 1000, t one of the training scheduler's own (shifted) timesteps, as diffusers' SD3 / FLUX training
  scripts index them; attacks pick timesteps by index 0..999 either way, index 0 the least noise).
- `cached_per_prompt`: one cache entry per prompt (its result does not depend on the batch), so a later run with
  more, fewer or reordered prompts, or another batch size, reads every prompt already attacked.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from erasekit.cache import cache_entry, read_json, write_json
from erasekit.errors import ErasekitError


# -- one random stream per prompt ------------------------------------------------------------------------------
def prompt_seed(seed: int, prompt: str, image_seed: int) -> int:
    """A 63-bit seed of (the attack's seed, the prompt, the prompt's image seed)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{prompt}\x00{int(image_seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def prompt_generators(seed: int, prompts: Sequence[str], image_seeds: Sequence[int], device) -> list:
    return [torch.Generator(torch.device(device)).manual_seed(prompt_seed(seed, p, s))
            for p, s in zip(prompts, image_seeds)]


def as_generators(generator, b: int) -> list:
    """A list of ``b`` generators: one per prompt as given, or one generator shared (drawn from in row order)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != b:
            raise ValueError(f"{len(generator)} generators for {b} prompts")
        return list(generator)
    return [generator] * b


def randn_rows(shape, generators, device) -> torch.Tensor:
    """(len(generators), *shape) standard normal draws, row j from ``generators[j]``."""
    return torch.cat([torch.randn((1, *shape), generator=g, device=device) for g in generators])


def randint_rows(high: int, generators, device) -> torch.Tensor:
    """One integer in [0, high) per generator."""
    return torch.cat([torch.randint(0, high, (1,), generator=g, device=device) for g in generators])


# -- the candidate tokens in every encoder's ids -----------------------------------------------------------------
@dataclass
class PrefixVocabulary:
    ids: torch.Tensor  # (V',) ids of the first tokenizer (what `tokens_text` decodes)
    per_encoder: list  # one (V',) tensor per text encoder (`family.encoders` order): the same words' ids

    def __len__(self) -> int:
        return len(self.ids)

    def tables(self, pipe, device=None) -> list[torch.Tensor]:
        """(V', E) float32 input embeddings of the candidates, one table per encoder."""
        from erasekit.diffusion.family import family_of

        out = []
        for table, ids in zip(family_of(pipe).token_embeddings(pipe), self.per_encoder):
            t = table.detach()[ids.to(table.device)].float()
            out.append(t.to(device) if device is not None else t)
        return out


_VOCABS: dict = {}


def prefix_vocabulary(pipe, exclude_words=()) -> PrefixVocabulary:
    """Whole-word candidates (`candidate_vocabulary` of the first tokenizer) that are exactly one token in every
    tokenizer of the family, with their id in each."""
    from erasekit.attacks.common import candidate_vocabulary
    from erasekit.diffusion.family import family_of

    encoders = family_of(pipe).encoders(pipe)
    key = tuple(id(tok) for _, tok, _ in encoders) + (len(encoders[0][1]), tuple(sorted(exclude_words)))
    if key in _VOCABS:
        return _VOCABS[key]
    first = encoders[0][1]
    base = candidate_vocabulary(first, exclude_words)
    words = [first.decode([int(i)]).strip() for i in base]
    keep = torch.ones(len(base), dtype=torch.bool)
    per = []
    for k, (_, tok, _) in enumerate(encoders):
        if k == 0:
            per.append(base)
            continue
        got = tok(words, add_special_tokens=False).input_ids
        ids = torch.tensor([g[0] if len(g) == 1 else -1 for g in got], dtype=torch.long)
        unk = getattr(tok, "unk_token_id", None)
        keep &= (ids >= 0) & (ids != (unk if unk is not None else -2))
        per.append(ids)
    if not keep.any():
        raise ErasekitError("no whole-word token is one token in every text encoder of this model")
    out = PrefixVocabulary(base[keep], [p[keep] for p in per])
    _VOCABS[key] = out
    return out


def as_prefix_vocabulary(pipe, vocab) -> PrefixVocabulary:
    """``vocab`` as a `PrefixVocabulary`: given, or a tensor of ids shared by every encoder (SD, SDXL)."""
    if isinstance(vocab, PrefixVocabulary):
        return vocab
    if vocab is None:
        return prefix_vocabulary(pipe)
    from erasekit.diffusion.family import family_of

    n = len(family_of(pipe).encoders(pipe))
    return PrefixVocabulary(vocab, [vocab] * n)


# -- the denoising loss of the family --------------------------------------------------------------------------
class DenoisingLoss:
    """The attacked pipeline's per-prompt denoising loss ``|| f(x_t, t | c) - target ||^2`` (mean per prompt),
    through its family: the UNet's epsilon / v target, or the flow transformer's velocity. ``guidance``: FLUX.1's
    distilled guidance input (the scale the images are drawn with); ignored by families without one."""

    def __init__(self, pipe, guidance: float | None = None):
        from erasekit.diffusion.family import family_of
        from erasekit.diffusion.guidance import UNetDenoiser

        self.family = family_of(pipe)
        self.net = self.family.denoiser(pipe)
        self.model = UNetDenoiser(self.net, self.family)
        if guidance is not None and "guidance" in inspect.signature(self.family.denoise).parameters:
            self.model.options = {"guidance": float(guidance)}
        self.schedule = self.family.schedule(pipe)
        self.num_train_timesteps = int(self.schedule.num_train_timesteps)
        self.device = torch.device(self.net.device)
        self.flow = bool(self.family.flow)
        self._flow_t = None
        if self.flow:  # the training scheduler's timesteps (shifted as its config says), least noise first
            from diffusers import FlowMatchEulerDiscreteScheduler

            train = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            self._flow_t = train.timesteps.float().flip(0).to(self.device)

    def timesteps(self, index) -> torch.Tensor:
        """The timesteps of training indices 0..num_train_timesteps - 1 on the model's device: DDPM's integer t
        itself; flow matching's sigma * 1000 of the training scheduler (float32)."""
        i = torch.as_tensor(index, device=self.device).to(torch.long)
        return self._flow_t[i] if self.flow else i

    def noised(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.add_noise(z0, noise, t)

    def target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.target(z0, noise, t)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return self.model(x_t, t, cond).float()

    def per_prompt(self, x_t, t, cond, target) -> torch.Tensor:
        """(B,) each prompt's own mean squared error."""
        return (self.predict(x_t, t, cond) - target.float()).pow(2).flatten(1).mean(1)


# -- one cache entry per prompt --------------------------------------------------------------------------------
def cached_per_prompt(cache_dir, name: str, keys: Sequence[dict], compute: Callable[[list[int]], list], *,
                      load: Callable[[Path], Any] = read_json, save: Callable[[Path, Any], None] = write_json,
                      complete: Callable[[Path], bool] = Path.is_file) -> tuple[list, int]:
    """(one value per key, how many were read from the cache): the entries there are read, the rest computed by
    one call ``compute(indices)`` (values in that order) and written one per prompt. An entry that no longer
    parses is computed again."""
    paths = [cache_entry(cache_dir, name, (key,)) for key in keys]
    values: list = [None] * len(keys)
    missing = []
    for i, path in enumerate(paths):
        if path is not None and complete(path):
            try:
                values[i] = load(path)
                continue
            except ValueError:
                pass
        missing.append(i)
    if missing:
        for i, value in zip(missing, compute(missing)):
            values[i] = value
            if paths[i] is not None:
                paths[i].parent.mkdir(parents=True, exist_ok=True)
                save(paths[i], value)
    return values, len(keys) - len(missing)


def per_prompt_settings(settings) -> dict:
    """The settings that decide one prompt's result: all but the batch size and the prompt list (the prompt
    itself is in the key)."""
    d = settings.to_dict()
    d.pop("batch_size", None)
    d.pop("prompts", None)
    return d


# -- Adam with a step count per row ------------------------------------------------------------------------------
class RowAdam:
    """Adam (torch.optim.Adam's arithmetic: L2 weight decay added to the gradient, bias corrections) over a (B, ...)
    tensor whose rows are independent problems, each with its own step count, so rows may join (a new prompt,
    zero state) and leave (a prompt that stopped) between steps: each row follows the trajectory it follows
    alone under torch.optim.Adam (float rounding of the per-row bias corrections apart)."""

    def __init__(self, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.weight_decay, self.betas, self.eps = float(lr), float(weight_decay), betas, float(eps)
        self.param: torch.Tensor | None = None
        self.exp_avg = self.exp_avg_sq = None
        self.steps = torch.zeros(0, dtype=torch.float64)

    def add_rows(self, values: torch.Tensor) -> None:
        """Append rows (their starting values) with a fresh state."""
        values = values.detach()
        zeros = torch.zeros_like(values)
        if self.param is None:
            self.param, self.exp_avg, self.exp_avg_sq = values.clone(), zeros, zeros.clone()
        else:
            self.param = torch.cat([self.param.detach(), values])
            self.exp_avg = torch.cat([self.exp_avg, zeros])
            self.exp_avg_sq = torch.cat([self.exp_avg_sq, zeros.clone()])
        self.steps = torch.cat([self.steps, torch.zeros(len(values), dtype=torch.float64)])
        self.param.requires_grad_(True)

    def keep_rows(self, keep: Sequence[int]) -> None:
        """Only the rows ``keep`` (in that order) stay, with their state."""
        idx = torch.as_tensor(list(keep), dtype=torch.long)
        dev = idx.to(self.param.device)
        self.param = self.param.detach()[dev].clone().requires_grad_(True)
        self.exp_avg, self.exp_avg_sq = self.exp_avg[dev], self.exp_avg_sq[dev]
        self.steps = self.steps[idx]

    def __len__(self) -> int:
        return 0 if self.param is None else len(self.param)

    @torch.no_grad()
    def step(self) -> None:
        p, grad = self.param, self.param.grad
        beta1, beta2 = self.betas
        if self.weight_decay:
            grad = grad.add(p, alpha=self.weight_decay)
        self.steps += 1
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        shape = (-1,) + (1,) * (p.ndim - 1)
        bc1 = 1 - beta1 ** self.steps  # float64, as Python's scalars in torch.optim.Adam
        bc2_sqrt = (1 - beta2 ** self.steps).sqrt()
        step_size = (self.lr / bc1).to(p.dtype).to(p.device).view(shape)
        denom = (self.exp_avg_sq.sqrt() / bc2_sqrt.to(p.dtype).to(p.device).view(shape)).add_(self.eps)
        p.sub_(step_size * (self.exp_avg / denom))

    def zero_grad(self) -> None:
        if self.param is not None:
            self.param.grad = None

"""What an attack produces: the inputs of one generation per image, and the budget it spent making them.

An attack never generates the final images itself: it hands `AttackInputs` to `erasekit.attacks.generate`,
which generates them (resumably) with the target pipeline. Inputs are prompts and seeds, optionally with a
per-image guidance scale (I2P), initial latents (DDIM inversion) or learned token vectors (textual inversion).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttackInputs:
    attack: str
    prompts: list[str]
    seeds: list[int]
    guidance: list[float | None] | None = None  # per image; None: the pipeline's default
    latents: torch.Tensor | None = None  # (N, C, h, w) initial latents replacing the seeded draw
    learned: Any = None  # a LearnedEmbedding whose tokens appear in the prompts
    items: list[dict] = field(default_factory=list)  # per-image fields recorded with the image (source image, case number)
    budget: dict = field(default_factory=dict)  # steps, images used, wall / CPU seconds, peak memory

    def __post_init__(self):
        n = len(self.prompts)
        if len(self.seeds) != n:
            raise ValueError(f"{n} prompts but {len(self.seeds)} seeds")
        if self.guidance is not None and len(self.guidance) != n:
            raise ValueError(f"{n} prompts but {len(self.guidance)} guidance values")
        if self.latents is not None and len(self.latents) != n:
            raise ValueError(f"{n} prompts but {len(self.latents)} latents")
        if not self.items:
            self.items = [{} for _ in range(n)]
        if len(self.items) != n:
            raise ValueError(f"{n} prompts but {len(self.items)} item records")

    def __len__(self) -> int:
        return len(self.prompts)

    def input_ids(self) -> list[str | None]:
        """Per image, a hash of the inputs other than the prompt and seed (latents, learned vectors), for the cache."""
        ids: list[str | None] = [None] * len(self)
        learned = f"ti:{self.learned.digest()}" if self.learned is not None else None
        for i in range(len(self)):
            parts = [learned] if learned else []
            if self.latents is not None:
                parts.append(f"latent:{tensor_digest(self.latents[i])}")
            ids[i] = "+".join(parts) or None
        return ids


def tensor_digest(t: torch.Tensor, n_chars: int = 16) -> str:
    t = t.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:n_chars]

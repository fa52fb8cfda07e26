"""What the UNet is conditioned on: text states (B, T, D) plus the extra inputs some families need.

SD-1.x/2.x need only the states; SDXL adds a pooled text embedding and time ids (``added``), which must be
sliced, repeated and concatenated together with the states. `Conditioning` keeps them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Conditioning:
    states: torch.Tensor  # (B, T, D)
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # per-item extra inputs (B, ...), e.g. SDXL's

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index) -> "Conditioning":
        return Conditioning(self.states[index], {k: v[index] for k, v in self.added.items()})

    def to(self, device=None, dtype=None) -> "Conditioning":
        return Conditioning(self.states.to(device=device, dtype=dtype),
                            {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                             for k, v in self.added.items()})

    def expand(self, n: int) -> "Conditioning":
        """One item repeated ``n`` times (a batch of the same prompt)."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a conditioning of {len(self)} items to {n}")
        return Conditioning(self.states.expand(n, *self.states.shape[1:]),
                            {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()})

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        keys = parts[0].added.keys()
        return Conditioning(torch.cat([p.states for p in parts]), {k: torch.cat([p.added[k] for p in parts]) for k in keys})

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.states}
        if self.added:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs

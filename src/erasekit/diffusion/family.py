"""Model-family adapters: how a family turns prompts into `Conditioning` and what its UNet predicts.

`SDFamily` covers SD-1.x (CLIP ViT-L, 768-d), SD-2.x (OpenCLIP, 1024-d, v-prediction) and the embedded world
(MiniLM, 384-d): one text encoder whose token states are the cross-attention input. A new family (SDXL: two
encoders, pooled embeddings, time ids) is one more class here and one more branch in `family_of`.
"""

from __future__ import annotations

import torch

from erasekit.diffusion.conditioning import Conditioning


class SDFamily:
    name = "sd"

    def encode(self, pipe, prompts, device=None) -> Conditioning:
        from erasekit.models.prompts import encode_prompts

        return Conditioning(encode_prompts(pipe, prompts, device=device))

    def from_states(self, pipe, states: torch.Tensor) -> Conditioning:
        """Conditioning from ready-made text states (learned embeddings, attacks' optimised prompts)."""
        return Conditioning(states)

    def prediction_type(self, pipe) -> str:
        return pipe.scheduler.config.get("prediction_type", "epsilon")


SD = SDFamily()


def family_of(pipe) -> SDFamily:
    """The adapter for ``pipe`` (only Stable Diffusion 1.x/2.x-shaped pipelines so far)."""
    return SD

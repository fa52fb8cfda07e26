"""Attacks over every input surface a user has: text prompts, learned embeddings, inverted latents.

Each attack produces `AttackInputs` (the generation inputs for one scenario, with the budget it spent);
`scenarios.run_scenario` runs one of the five M-ErasureBench scenarios end to end. ``REGISTRY`` maps each
attack to a one-line description (``erasekit ls``); ``SCENARIOS`` the scenarios.
"""

from erasekit.attacks.base import AttackInputs
from erasekit.attacks.scenarios import SCENARIOS, ScenarioConfig, build_inputs, run_scenario

REGISTRY: dict[str, str] = {
    "text": "prompts naming the concept: the world's templates + synonyms + held-out paraphrases, or generic templates",
    "i2p": "prompts from an I2P-layout CSV (prompt, evaluation_seed, evaluation_guidance), per-row seed and guidance",
    "textual_inversion": "learn a new token's vectors from concept images (CLIP or BERT encoders); diffusers format",
    "ddim_inversion": "VAE-encode concept images, DDIM-invert them to noise, regenerate (empty or concept prompt)",
}


def list_methods() -> dict[str, str]:
    """Attack name -> one-line description (and the scenarios that use them)."""
    return dict(REGISTRY)


__all__ = ["REGISTRY", "SCENARIOS", "AttackInputs", "ScenarioConfig", "build_inputs", "run_scenario", "list_methods"]

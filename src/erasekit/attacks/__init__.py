"""Attacks over every input surface a user has: text prompts, learned embeddings, inverted latents.

Each attack is one registered file (`erasekit.registry.ATTACKS`) that declares the scenarios it serves and turns
them into `AttackInputs`; `scenarios.run_scenario` runs a scenario end to end.
"""

from erasekit.attacks.base import Attack, AttackContext, AttackInputs

# Importing an attack module registers it.
from erasekit.attacks import ddim_inversion, text, textual_inversion  # noqa: E402,F401  isort:skip
from erasekit.attacks import p4d, ring_a_bell, unlearndiffatk  # noqa: E402,F401  isort:skip
from erasekit.attacks.scenarios import ScenarioConfig, run_scenario, scenario_names, scenarios  # noqa: E402

__all__ = ["Attack", "AttackContext", "AttackInputs", "ScenarioConfig", "run_scenario", "scenario_names", "scenarios"]

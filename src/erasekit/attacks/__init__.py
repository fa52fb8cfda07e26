"""Attacks over every input surface a user has: text prompts, learned embeddings, inverted latents.

Each attack is one registered file (`erasekit.registry.ATTACKS`, which imports every module here on first use) that
declares the scenarios it serves and turns them into `AttackInputs`; `scenarios.run_scenario` runs a scenario end to
end. `common` holds what the prompt-optimising attacks share.
"""

from erasekit.attacks.base import Attack, AttackContext, AttackInputs
from erasekit.attacks.scenarios import ScenarioConfig, run_scenario, scenario_names, scenarios

__all__ = ["Attack", "AttackContext", "AttackInputs", "ScenarioConfig", "run_scenario", "scenario_names", "scenarios"]

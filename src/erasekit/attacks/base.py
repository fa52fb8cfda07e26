"""What every attack is: a registered component that turns a scenario into generation inputs.

An attack never generates the final images itself: it returns `AttackInputs` (prompts and seeds, optionally
per-image guidance, initial latents or a learned embedding, plus the budget it spent), which the scenario runner
generates with the target. It declares the scenarios it serves as data:

    @ATTACKS.register
    class TextualInversionAttack(Attack):
        name, alias = "textual_inversion", "ti"          # --set ti.steps=800
        scenarios = {"embedding-bb": {"learn_on": "original"}, "embedding-wb": {"learn_on": "target"}}
        Settings = TextualInversionConfig
        def inputs(self, ctx, learn_on): ...

so adding an attack is one file: `erasekit ls`, ``erasekit attack --scenario`` and the benchmark find it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from erasekit.generation import GenerationInputs
from erasekit.settings import Settings


@dataclass
class AttackInputs(GenerationInputs):
    attack: str = ""
    budget: dict = field(default_factory=dict)  # steps, images used, wall / CPU seconds, peak memory


@dataclass
class AttackContext:
    """Everything a scenario gives an attack."""

    target: Any  # the `Target` under attack (edits and defences applied while it samples)
    concept: str
    n: int
    seed: int = 0
    steps: int | None = None  # sampling steps (None: the world's)
    batch_size: int = 32
    images_folder: Path | None = None  # concept images (attacks that learn from images)
    prompts_csv: Path | None = None  # I2P-layout prompts (text)
    cache_dir: Path | None = None  # costly intermediate results, keyed by content
    notes: list[str] = field(default_factory=list)
    progress: bool = True
    detector: Any = None  # the scenario's detector (attacks that judge success per image, probes' best-of-N)

    @property
    def original(self):
        return self.target.original()

    def learner(self, learn_on: str):
        """The target an attack learns on: the original model (black-box) or the attacked one (white-box).

        Without its defences: learning (textual inversion's training, DDIM inversion) never samples through them, so
        a token or an inversion is shared by every defence of one model (their cache keys omit the defences)."""
        return self.original if learn_on == "original" else self.target.without_defences()


class Attack:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    alias: ClassVar[str] = ""  # short prefix for --set (``ti.steps``); the name works too
    Settings: ClassVar[type[Settings]] = Settings
    scenarios: ClassVar[dict[str, dict]] = {}  # scenario name -> keyword arguments of `inputs`
    order: ClassVar[int] = 100  # where its scenarios appear in listings and tables
    needs_unet: ClassVar[bool] = True  # False: runs on transformer families too (`erasekit.diffusion.support`)

    def __init__(self, settings: Settings | None = None):
        self.settings = settings if settings is not None else self.Settings()
        self.settings.validate()

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any] | None = None) -> "Attack":
        return cls(cls.Settings().replace(overrides or {}))

    def inputs(self, ctx: AttackContext, **scenario) -> AttackInputs:
        raise NotImplementedError

"""A bench cell (concept x method x scenario) and the two scenario names that are not attacks: what the results
rows, the tables and the report name cells by. A leaf module: the report reads cells without importing the runner."""

from __future__ import annotations

import re
from dataclasses import dataclass

from erasekit.store import content_key

PRESERVATION = "preservation"  # the scenario name of a method's non-target images
REFERENCE = "reference"  # the original model's non-target images (the Fréchet distance's reference)


@dataclass(frozen=True)
class Cell:
    concept: str
    method: str  # the method's label
    scenario: str  # a scenario name, PRESERVATION or REFERENCE

    @property
    def id(self) -> str:
        return f"{self.concept}/{self.method}/{self.scenario}"

    @property
    def folder(self) -> str:
        """A file-system-safe name, unique per cell."""
        text = re.sub(r"[^a-z0-9]+", "-", self.id.lower()).strip("-")[:60]
        return f"{text}-{content_key(self.id, n_chars=6)}"

    @property
    def kind(self) -> str:
        return self.scenario if self.scenario in (PRESERVATION, REFERENCE) else "attack"

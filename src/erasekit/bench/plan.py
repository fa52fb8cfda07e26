"""The plan of a benchmark: cells (concept x method x scenario, plus preservation), each a list of image jobs.

A cell is known from the config alone; its image jobs come from its scenario's attack inputs (prompts, seeds,
initial latents or a learned token), built against the cell's target. Every job has its own seed and its own
content key (`Job.key`): the target's cache id (base fingerprint, edit digests, defence records), the prompt, the
seed, the sampler settings and the digest of any latent / learned input. Jobs with equal keys are one image,
generated once and shared (the original model's black-box and white-box tokens, for instance).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from erasekit.bench.spec import BenchConfig
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


@dataclass
class Job:
    """One image of a cell."""

    cell: Cell
    index: int
    prompt: str
    seed: int
    steps: int
    guidance: float
    inputs: str | None = None  # digest of latents / learned vectors (None: prompt and seed only)
    label: str | None = None  # preservation: the concept the prompt asks for
    target_id: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return content_key("image", self.target_id, self.prompt, self.seed, self.steps, self.guidance, self.inputs)

    @property
    def row_id(self) -> str:
        return f"{self.cell.id}#{self.index}"


def cells(cfg: BenchConfig) -> list[Cell]:
    """Every cell, in table order: per concept, per method, each scenario then preservation; the reference last."""
    from erasekit.bench.groups import member_names

    out = []
    for concept in member_names(cfg):  # a group's erased concepts each in its place (`erasekit.bench.groups`)
        for method in cfg.methods:
            out.extend(Cell(concept, method.name, s) for s in cfg.scenarios)
            if cfg.preservation.enabled:
                out.append(Cell(concept, method.name, PRESERVATION))
        if cfg.preservation.enabled:
            out.append(Cell(concept, "original", REFERENCE))
    return out


def preservation_jobs(cell: Cell, pairs: list[tuple[str | None, str]], n: int, seed: int, steps: int,
                      guidance: float, target_id: str) -> list[Job]:
    """``n`` images cycling over the (label, prompt) pairs, seeds ``seed + i`` (the same for every method)."""
    return [Job(cell, i, pairs[i % len(pairs)][1], seed + i, steps, guidance, None, pairs[i % len(pairs)][0], target_id)
            for i in range(n)]


def attack_jobs(cell: Cell, inputs, steps: int, guidance: float, target_id: str) -> list[Job]:
    """One job per item of an attack's `AttackInputs`."""
    ids = inputs.input_ids()
    jobs = []
    for i in range(len(inputs)):
        g = inputs.guidance[i] if inputs.guidance is not None and inputs.guidance[i] is not None else guidance
        extra = {k: v for k, v in inputs.items[i].items() if k in ("source", "source_truth", "case_number")}
        jobs.append(Job(cell, i, inputs.prompts[i], int(inputs.seeds[i]), steps, float(g), ids[i], None, target_id,
                        extra))
    return jobs

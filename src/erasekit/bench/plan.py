"""The plan of a benchmark: cells (concept x method x scenario, plus preservation), each a list of image jobs.

A cell is known from the config alone; its image jobs come from its scenario's attack inputs (prompts, seeds,
initial latents or a learned token), built against the cell's target. Every job has its own seed and the image key
of the one store (`Job.key` = `erasekit.image_store.record_key` of `Job.record`, the record
`erasekit.generation.generate_to_dir` writes for that image): the target's key (base fingerprint, edit digests,
defence records), the prompt, the seed, the sampler settings and the digest of any latent / learned input. Jobs
with equal keys are one image, generated once and shared (the original model's black-box and white-box tokens,
for instance).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from erasekit.bench.cells import PRESERVATION, REFERENCE, Cell
from erasekit.image_store import record_key

if TYPE_CHECKING:
    from erasekit.bench.spec import BenchConfig

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
    target_id: str = ""  # `erasekit.generation.target_key` of the cell's target
    extra: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)  # the target's scheduler and image size (`sampling_fields`)

    @property
    def record(self) -> dict:
        """The fields of this image's record that its key hashes (no negative prompt, eta 0: bench images)."""
        return {"prompt": self.prompt, "negative_prompt": None, "seed": self.seed, "steps": self.steps,
                "guidance": self.guidance, "eta": 0.0, **self.sampling, "target": self.target_id,
                "inputs": self.inputs}

    @property
    def key(self) -> str:
        return record_key(self.record)

    @property
    def row_id(self) -> str:
        return f"{self.cell.id}#{self.index}"


def cells(cfg: BenchConfig) -> list[Cell]:
    """Every cell, in table order: per concept, per method, each scenario then preservation; the reference last."""
    from erasekit.bench.spec import member_names

    out = []
    for concept in member_names(cfg):  # a group's erased concepts each in its place (`erasekit.bench.groups`)
        for method in cfg.methods:
            out.extend(Cell(concept, method.name, s) for s in cfg.scenarios)
            if cfg.preservation.enabled:
                out.append(Cell(concept, method.name, PRESERVATION))
        if cfg.preservation.enabled:
            out.append(Cell(concept, "original", REFERENCE))
    return out


def sampling_fields(fields: dict) -> dict:
    """The keyed fields of `erasekit.generation.target_fields` other than the target's key: scheduler, size."""
    return {k: fields[k] for k in ("scheduler", "height", "width")}


def preservation_jobs(cell: Cell, pairs: list[tuple[str | None, str]], n: int, seed: int, steps: int,
                      guidance: float, target_id: str, sampling: dict | None = None) -> list[Job]:
    """``n`` images cycling over the (label, prompt) pairs, seeds ``seed + i`` (the same for every method)."""
    return [Job(cell, i, pairs[i % len(pairs)][1], seed + i, steps, guidance, None, pairs[i % len(pairs)][0], target_id,
                sampling=dict(sampling or {})) for i in range(n)]


def attack_jobs(cell: Cell, inputs, steps: int, guidance: float, target_id: str, sampling: dict | None = None
                ) -> list[Job]:
    """One job per item of an attack's `AttackInputs`."""
    ids = inputs.input_ids()
    jobs = []
    for i in range(len(inputs)):
        g = inputs.guidance[i] if inputs.guidance is not None and inputs.guidance[i] is not None else guidance
        extra = {k: v for k, v in inputs.items[i].items() if k in ("source", "source_truth", "case_number")}
        jobs.append(Job(cell, i, inputs.prompts[i], int(inputs.seeds[i]), steps, float(g), ids[i], None, target_id,
                        extra, dict(sampling or {})))
    return jobs


def csv_jobs(cell: Cell, rows: list[dict], n: int, seed: int, steps: int, guidance: float, target_id: str,
             sampling: dict | None = None) -> list[Job]:
    """``n`` preservation jobs from a quality CSV's rows in order (cycling), each with its row's seed (else
    ``seed + i``)."""
    jobs = []
    for i in range(n):
        r = rows[i % len(rows)]
        extra = {"image_id": r["image_id"]} if r.get("image_id") else {}
        jobs.append(Job(cell, i, r["prompt"], r["seed"] if r["seed"] is not None else seed + i, steps, guidance, None,
                        None, target_id, extra, dict(sampling or {})))
    return jobs


# -- what the plan asks of the run (spec.py holds the config alone: no import back) ----------------------------
def planned_images(cfg: BenchConfig) -> int:
    """Images the plan asks for, from the config alone (each cell's count; shared images counted per cell)."""
    return sum(cfg.images_per_cell if c.kind == "attack" else cfg.preservation_images() for c in cells(cfg))


def resolve_fast(cfg: BenchConfig, device, steps: int, guidance: float) -> tuple[BenchConfig, dict]:
    """(the config with ``fast`` true or false, the choice as recorded: setting, chosen, why)."""
    if cfg.precision != "default":
        from erasekit.diffusion.fp8 import check_fp8_device

        check_fp8_device(device)
        return dataclasses.replace(cfg, fast=True), {"setting": cfg.fast, "chosen": True,
                                                     "why": f"precision {cfg.precision}"}
    if cfg.fast != "auto":
        return cfg, {"setting": cfg.fast, "chosen": bool(cfg.fast), "why": "set in the config"}
    from erasekit.diffusion.speed import auto_fast

    chosen, why = auto_fast(device, planned_images(cfg), steps, guidance)
    return dataclasses.replace(cfg, fast=chosen), {"setting": "auto", "chosen": chosen, "why": why,
                                                   "images_planned": planned_images(cfg)}

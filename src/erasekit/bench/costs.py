"""What each bench stage costs: wall, CPU, peak memory, images and UNet evaluations, one ``costs.jsonl`` row each."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


class UNetCounter:
    """Counts denoiser evaluations (batch items through the family's UNet or transformer; a CFG pass counts its two
    halves)."""

    def __init__(self, pipe):
        from erasekit.diffusion.family import family_of

        self.n = 0
        denoiser = family_of(pipe).denoiser(pipe)
        self._handle = denoiser.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if sample is not None:
            self.n += int(sample.shape[0])

    def close(self):
        self._handle.remove()


@dataclass
class StageLog:
    run_id: str
    counter: UNetCounter | None = None
    rows: list[dict] = field(default_factory=list)
    sink: Any = None  # called with each finished stage's row (the main process appends it to costs.jsonl)

    @contextmanager
    def stage(self, name: str, defer: bool = False, **extra):
        from erasekit.metrics import measure_cost

        before = self.counter.n if self.counter else 0
        with measure_cost() as cost:
            yield cost
        row = {"run": self.run_id, "stage": name, **cost.as_dict(), **extra}
        row["unet_evals"] = (self.counter.n if self.counter else 0) - before
        self.rows.append(row)
        if self.sink is not None and not defer:
            self.sink([row])  # written as each stage ends: a killed run keeps the cost of what it finished

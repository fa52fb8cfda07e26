"""What a step cost: wall seconds, CPU seconds, peak memory and images generated.

    with measure_cost() as cost:
        images = generate(...)
        cost.add_images(len(images))
    cost.as_dict()  # {"wall_s", "cpu_s", "peak_rss_mb", "cuda_peak_mb", "images", ...}

Peak RSS: on Linux the process high-water mark (``VmHWM``) is reset at the start of the block (writing "5" to
``/proc/self/clear_refs``), so the figure is this block's own peak; where that is not possible
(other systems, restricted containers) it is the process's lifetime peak (``getrusage``), and
``rss_scope`` says "process". CPU seconds cover every thread of the process (user + system).
CUDA peak memory is ``torch.cuda.max_memory_allocated`` over the block, when CUDA is initialised. ``threads``:
torch's intra-op threads at the end of the block and ``threads_source`` how they were chosen (`erasekit.threads`);
a CPU figure means little without them.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field


@dataclass
class Cost:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float | None = None
    rss_scope: str = "block"  # "block": the peak within this block; "process": the process's lifetime peak
    cuda_peak_mb: float | None = None
    images: int = 0
    threads: int | None = None
    threads_source: str | None = None
    extra: dict = field(default_factory=dict)

    def add_images(self, n: int) -> None:
        self.images += int(n)

    def as_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        for key in ("wall_s", "cpu_s", "peak_rss_mb", "cuda_peak_mb"):
            if d[key] is not None:
                d[key] = round(float(d[key]), 3)
        return d


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _rusage_peak_mb() -> float | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB on Linux


def _record_threads(cost: Cost) -> None:
    torch = sys.modules.get("torch")
    if torch is None:
        return
    from erasekit.threads import current

    record = current()
    cost.threads = torch.get_num_threads()  # what the block ran with, even if changed since the choice
    cost.threads_source = record.get("threads_source") if record.get("threads") == cost.threads else "torch"


def _cuda():
    torch = sys.modules.get("torch")  # never import torch just to measure
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda
    return None


# Blocks open right now, innermost last: a block that starts resets the process's peak counters, so it first hands
# the peak so far to every enclosing block, and when it ends it hands them its own peak (nested blocks then report
# their own peak and the outer ones the true peak over their whole span).
_open: list[dict] = []


def _current_peaks(block_scope: bool, cuda) -> tuple[float | None, float | None]:
    rss = _vm_hwm_mb() if block_scope else _rusage_peak_mb()
    return rss, (cuda.max_memory_allocated() / 2**20 if cuda is not None else None)


def _fold(seen: dict, rss, cuda_mb) -> None:
    for key, value in (("rss", rss), ("cuda", cuda_mb)):
        if value is not None:
            seen[key] = max(seen.get(key) or 0.0, value)


@contextmanager
def measure_cost(**extra):
    """Measure the block; yields a `Cost` filled in when the block ends (also when it raises). Blocks nest."""
    cost = Cost(extra=dict(extra))
    cuda = _cuda()
    if _open:  # hand the peak so far to the enclosing blocks before this block resets the counters
        rss, cuda_mb = _current_peaks(_open[-1]["block_scope"], cuda)
        for outer in _open:
            _fold(outer, rss, cuda_mb)
    block_scope = _reset_rss_peak() and _vm_hwm_mb() is not None
    if cuda is not None:
        cuda.reset_peak_memory_stats()
    mine = {"block_scope": block_scope}
    _open.append(mine)
    wall0, cpu0 = time.perf_counter(), os.times()
    raised = False
    try:
        yield cost
    except BaseException:
        raised = True
        raise
    finally:
        cpu1 = os.times()
        _open[:] = [block for block in _open if block is not mine]  # by identity: two blocks' dicts may be equal
        cost.wall_s = time.perf_counter() - wall0
        cost.cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        cuda = cuda or _cuda()
        if cuda is not None:
            try:
                cuda.synchronize()
            except Exception:
                # A CUDA fault is sticky: when the block already raised (the fault itself), synchronize raises it
                # again and would hide where it happened; let the block's own exception through.
                if not raised:
                    raise
        rss, cuda_mb = _current_peaks(block_scope, cuda)
        _fold(mine, rss, cuda_mb)
        for outer in _open:
            _fold(outer, mine.get("rss"), mine.get("cuda"))
        cost.peak_rss_mb, cost.rss_scope = mine.get("rss"), "block" if block_scope else "process"
        _record_threads(cost)
        cost.cuda_peak_mb = mine.get("cuda")

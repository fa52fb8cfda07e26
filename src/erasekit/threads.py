"""How many intra-op threads torch uses: from the cores actually free, unless the user says.

torch starts one intra-op thread per core. Beside other busy processes those threads wait on each other and a
2-core machine with one core taken runs 10-40x slower than with one thread. So, in order of precedence:

1. ``--threads N`` (the global option of every command),
2. the ``ERASEKIT_THREADS`` environment variable,
3. ``OMP_NUM_THREADS`` when set (torch's own convention),
4. auto: the cores this process may run on (``os.sched_getaffinity``) less the ones other work keeps busy (the
   1-minute load average, rounded), at least one.

``N`` is a whole number >= 1 or ``auto``. The choice is recorded in every cost record (`erasekit.metrics.cost`).
"""

from __future__ import annotations

import os
from typing import Mapping

from erasekit.errors import ErasekitError

ENV_VAR = "ERASEKIT_THREADS"
MAX_THREADS = 1024

_requested: str | None = None  # --threads, set by the command line
_chosen: dict | None = None  # what `apply` set: {"threads", "threads_source", "cores"}


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; cgroup-limited containers show up there too)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def parse(value: str, where: str) -> int | None:
    """``value`` as a thread count; None for "auto"; `ErasekitError` otherwise."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        raise ErasekitError(f"{where}={value[:20]!r}: must be a whole number >= 1 or auto") from None
    if not 1 <= n <= MAX_THREADS:
        raise ErasekitError(f"{where}={n}: must be between 1 and {MAX_THREADS}, or auto")
    return n


def auto_threads(cores: int, load: float | None) -> int:
    """The cores not kept busy by other work: ``cores - round(load)``, between 1 and ``cores``.

    The load average counts this process too once it has run a while; it is read at start-up, before the work."""
    if load is None:
        return cores
    return max(1, min(cores, cores - int(round(load))))


def choose(requested: str | None = None, env: Mapping[str, str] | None = None, cores: int | None = None,
           load: float | None = None) -> tuple[int, str]:
    """(thread count, where it came from: "--threads", ENV_VAR, "OMP_NUM_THREADS" or "auto")."""
    env = os.environ if env is None else env
    for source, value in (("--threads", requested), (ENV_VAR, env.get(ENV_VAR)),
                          ("OMP_NUM_THREADS", env.get("OMP_NUM_THREADS"))):
        if value is None or not str(value).strip():
            continue
        n = parse(value, source)
        if n is not None:
            return n, source
    cores = available_cores() if cores is None else cores
    return auto_threads(cores, load_average() if load is None else load), "auto"


def request(value: str | None) -> None:
    """Record ``--threads`` (checked now, applied when torch is set up)."""
    global _requested
    if value is not None:
        parse(value, "--threads")
    _requested = value


def apply() -> dict:
    """Set torch's intra-op threads as chosen; returns the record (also `current()`)."""
    global _chosen
    import torch

    n, source = choose(_requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _chosen = {"threads": n, "threads_source": source, "cores": available_cores()}
    return dict(_chosen)


def current() -> dict:
    """The record of the last `apply`, or torch's own count when erasekit did not set it (library use)."""
    import sys

    if _chosen is not None:
        return dict(_chosen)
    torch = sys.modules.get("torch")
    return {"threads": torch.get_num_threads(), "threads_source": "torch"} if torch is not None else {}

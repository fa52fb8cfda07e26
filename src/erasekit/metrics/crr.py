"""Concept reproduction rate (CRR) and its Wilson score interval.

CRR (M-ErasureBench) is the share of generated images in which the concept detector finds the concept.
The interval is Wilson's score interval (not the normal approximation, which collapses to a point at 0% and
100% and leaves [0, 1] for small n): with p = k/n and z the normal quantile,

    centre = (p + z²/2n) / (1 + z²/n),  half = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²).

Degenerate images (``valid: false`` rows) are left out of k / n and counted as ``invalid`` (`valid_flags`).
Pure functions over plain numbers: no torch, no numpy.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Iterable

Z95 = 1.959963984540054  # NormalDist().inv_cdf(0.975)


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return Z95 if confidence == 0.95 else NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (low, high) for ``successes`` out of ``n``; (0.0, 1.0) when n == 0."""
    if isinstance(successes, bool) or isinstance(n, bool) or int(successes) != successes or int(n) != n:
        raise ValueError(f"successes and n must be integers, got {successes!r}, {n!r}")
    k, n = int(successes), int(n)
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={k}, n={n}")
    z = _z(confidence)
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
    # Exact at the ends (the formula gives 0 and 1 there up to rounding).
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def concept_reproduction_rate(present: Iterable[bool]) -> float:
    """Share of True in ``present`` (one flag per image); NaN for no images."""
    flags = [bool(x) for x in present]
    return sum(flags) / len(flags) if flags else float("nan")


def crr_summary(present: Iterable[bool], confidence: float = 0.95, invalid: int = 0) -> dict:
    """``{"crr", "ci": [low, high], "n", "k", "invalid", "confidence"}`` for one flag per valid image (crr is None
    when n == 0). ``invalid``: how many degenerate images were left out (see `rows_crr`)."""
    flags = [bool(x) for x in present]
    k, n = sum(flags), len(flags)
    low, high = wilson_interval(k, n, confidence)
    return {"crr": k / n if n else None, "ci": [low, high], "n": n, "k": k, "invalid": int(invalid),
            "confidence": confidence}


def valid_flags(rows: Iterable[dict], field: str = "present") -> tuple[list[bool], int]:
    """(``field`` of every valid row, the number of invalid rows). A row is invalid when it says ``valid: false``:
    a degenerate image (non-finite latents, a constant image; `erasekit.validity`). Such an image shows nothing,
    so it is neither "concept present" nor "absent": it leaves the denominator and is counted on its own, and a
    cell whose images are all invalid has no CRR (None), never 0%."""
    flags, invalid = [], 0
    for r in rows:
        if r.get("valid", True) is False:
            invalid += 1
        else:
            flags.append(r[field])
    return flags, invalid


def rows_crr(rows: Iterable[dict], confidence: float = 0.95) -> dict:
    """`crr_summary` over the valid rows, with the invalid ones counted (`valid_flags`)."""
    flags, invalid = valid_flags(rows)
    return crr_summary(flags, confidence, invalid)

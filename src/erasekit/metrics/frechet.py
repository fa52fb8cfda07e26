"""The Fréchet distance and the kernel distance (KID) between two sets of image features.

FD = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2)), in float64, with tr((S_1 S_2)^(1/2)) taken as the sum
of the square roots of the eigenvalues of S_1^(1/2) S_2 S_1^(1/2) (symmetric, so its eigenvalues are real and >= 0 up
to rounding): the quantity torchmetrics' FrechetInceptionDistance computes from eig(S_1 S_2). KID is the unbiased
MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets (Binkowski et al. 2018,
as torchmetrics and clean-fid); the subsets are drawn from a seeded generator, so KID is reproducible.
"""

from __future__ import annotations

import numpy as np


def _stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(f, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float | None:
    """FD between feature sets ``a`` (N, D) and ``b`` (M, D); None when either has fewer than 2 rows."""
    if len(a) < 2 or len(b) < 2:
        return None
    mu1, s1 = _stats(a)
    mu2, s2 = _stats(b)
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    return max(value, 0.0)


def _mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kernel_distance(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> dict | None:
    """KID (mean and std over ``subsets`` random subsets of ``min(subset_size, N, M)`` rows each); None below 2."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        return None
    rng = np.random.default_rng(seed)
    values = [_mmd2(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
              for _ in range(subsets)]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "subsets": subsets, "subset_size": size}

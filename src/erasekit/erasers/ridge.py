"""The closed-form ridge edit shared by UCE, RECE and any later closed-form method.

For every layer l (a cross-attention K or V matrix W0_l of shape (out_l, d)) find

    W_l = argmin_W  λ ||W − W0_l||²  +  Σ_i s_i ||W c_i − v_il||²
        = (λ W0_l + Σ_i s_i v_il c_iᵀ) (λ I + Σ_i s_i c_i c_iᵀ)⁻¹

where the inputs c_i (text-token states, width d) are shared by all layers and the targets v_il are per layer.
Everything is accumulated and solved in float64 with `torch.linalg.solve` (never an explicit inverse, never half
precision), on the device of the weights.

Two exact ways to solve, picked by the number of rows n against the width d:

- primal (n >= d): the statistics Σ s c cᵀ (d×d, shared by every layer) and Σ s v cᵀ (per layer); one solve with
  the shared Gram matrix and the right-hand sides of all layers side by side (all layers batched into one call,
  whatever their output sizes);
- dual (n < d, the usual case: a concept is a handful of tokens): W_l = W0_l + (V_l − C W0_lᵀ)ᵀ K⁻¹ C with the
  n×n kernel K = λ I + C Cᵀ (rows of C scaled by √s). Identical in exact arithmetic, far cheaper: SD-1.4's 32
  matrices need one n×n solve instead of a 768×768 solve with 25,000 right-hand sides.
"""

from __future__ import annotations

from typing import Sequence

import torch

F64 = torch.float64


class RidgeProblem:
    """Accumulate rows (inputs c_i, per-layer targets v_il, weight s_i) for many layers, then `solve`."""

    def __init__(self, weights: Sequence[torch.Tensor], lam: float):
        if not weights:
            raise ValueError("no layers to edit")
        if not lam > 0:
            raise ValueError(f"the ridge weight λ must be > 0, got {lam}")
        widths = {w.shape[1] for w in weights}
        if len(widths) != 1:
            raise ValueError(f"layers must share their input width, got {sorted(widths)}")
        # All layers stacked in one float64 matrix (one large product is 2-3x faster than 32 small ones on a CPU).
        self.sizes = [w.shape[0] for w in weights]
        base = weights[0]._base if weights[0]._base is not None else None
        if base is not None and base.dtype == F64 and base.dim() == 2 and base.shape[0] == sum(self.sizes) \
                and all(w._base is base for w in weights) \
                and [w.data_ptr() for w in weights] == [v.data_ptr() for v in base.split(self.sizes)]:
            self.stacked = base.detach()  # already stacked (LowRankEdits.layers()): no copy
        else:
            self.stacked = torch.cat([w.detach().to(F64) for w in weights])
        self.w0 = list(self.stacked.split(self.sizes))
        self.width = widths.pop()
        self.lam = float(lam)
        self.device = self.w0[0].device
        self._inputs: list[torch.Tensor] = []  # (n_k, d), rows scaled by √s
        self._targets: list[list[torch.Tensor] | None] = []  # per block, per layer: (n_k, out_l), rows scaled by √s
        self._sources: list[torch.Tensor | None] = []  # mapping blocks: sources (n_k, d) scaled by √s, targets W0 s

    @property
    def n_rows(self) -> int:
        return sum(len(c) for c in self._inputs)

    def add(self, inputs: torch.Tensor, targets: Sequence[torch.Tensor], scale: float = 1.0) -> None:
        """Rows c_i (n, d) with targets v_il (n, out_l) for every layer, each weighted by ``scale``."""
        if scale < 0:
            raise ValueError(f"row weights must be >= 0, got {scale}")
        inputs = inputs.detach().to(device=self.device, dtype=F64).reshape(-1, self.width)
        if len(targets) != len(self.w0):
            raise ValueError(f"expected targets for {len(self.w0)} layers, got {len(targets)}")
        targets = [t.detach().to(device=self.device, dtype=F64).reshape(len(inputs), w.shape[0])
                   if t.numel() == len(inputs) * w.shape[0] else t for t, w in zip(targets, self.w0)]
        for t, w in zip(targets, self.w0):
            if t.dim() != 2 or tuple(t.shape) != (len(inputs), w.shape[0]):
                raise ValueError(f"targets of shape {tuple(t.shape)} do not fit {len(inputs)} rows and a layer "
                                 f"with {w.shape[0]} outputs")
        if scale == 0 or len(inputs) == 0:
            return
        root = scale**0.5
        self._inputs.append(inputs * root)
        self._targets.append([t * root for t in targets])
        self._sources.append(None)

    def add_mapping(self, inputs: torch.Tensor, sources: torch.Tensor, scale: float = 1.0,
                    through: Sequence[torch.Tensor] | None = None) -> None:
        """Rows asking each layer to map c_i to what ``through`` (default: the original weights) gives for
        ``sources[i]``: v_il = W_l s_i. UCE's erase term (sources = guide states) and preserve term (sources = inputs).

        Mapping rows through W0 are kept as (c, s) pairs: the dual solve then needs one product (S − C) W0ᵀ per layer
        instead of two, and the targets are only formed if a caller asks for them."""
        src = sources.detach().to(device=self.device, dtype=F64).reshape(-1, self.width)
        if through is not None:
            mats = [w.detach().to(device=self.device, dtype=F64) for w in through]
            self.add(inputs, [src @ w.T for w in mats], scale)
            return
        if scale < 0:
            raise ValueError(f"row weights must be >= 0, got {scale}")
        inputs = inputs.detach().to(device=self.device, dtype=F64).reshape(-1, self.width)
        if len(inputs) != len(src):
            raise ValueError(f"{len(inputs)} inputs but {len(src)} sources")
        if scale == 0 or len(inputs) == 0:
            return
        root = scale**0.5
        self._inputs.append(inputs * root)
        self._targets.append(None)
        self._sources.append(src * root)

    def _block_targets(self, k: int) -> list[torch.Tensor]:
        if self._targets[k] is None:
            return [self._sources[k] @ w.T for w in self.w0]
        return self._targets[k]

    def _stacked(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        c = torch.cat(self._inputs) if self._inputs else torch.zeros(0, self.width, dtype=F64, device=self.device)
        blocks = [self._block_targets(k) for k in range(len(self._inputs))]
        v = [torch.cat([blk[l] for blk in blocks]) if blocks else
             torch.zeros(0, w.shape[0], dtype=F64, device=self.device) for l, w in enumerate(self.w0)]
        return c, v

    def _dual_residual(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, V − C W0ᵀ for all layers side by side (n, Σ out))."""
        c = torch.cat(self._inputs)
        if all(t is None for t in self._targets):
            return c, (torch.cat(self._sources) - c) @ self.stacked.T
        c, v = self._stacked()
        return c, torch.cat(v, dim=1) - c @ self.stacked.T

    def statistics(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(Σ s c cᵀ of shape (d, d), [Σ s v_l cᵀ of shape (out_l, d) per layer]), float64.

        Block by block, and a mapping block's Σ v cᵀ as W0_l (Σ s cᵀ): its n × Σ out targets are never formed
        (mass erasure: MACE's refinement of 100 concepts has ~46,000 rows, whose targets on SD-1.4's 32 layers
        would take 9 GB in float64 before the cross products)."""
        gram = torch.zeros(self.width, self.width, dtype=F64, device=self.device)
        mapped = torch.zeros(self.width, self.width, dtype=F64, device=self.device)  # Σ s cᵀ of mapping blocks
        cross = torch.zeros(len(self.stacked), self.width, dtype=F64, device=self.device)  # layers stacked
        for k, c in enumerate(self._inputs):
            gram += c.T @ c
            if self._targets[k] is None:
                mapped += self._sources[k].T @ c
            else:
                cross += torch.cat(self._targets[k], dim=1).T @ c
        cross += self.stacked @ mapped  # one product with W0 for every mapping block (not one per block)
        return gram, list(cross.split(self.sizes))

    def solve(self, method: str = "auto") -> list[torch.Tensor]:
        """The edited weights (float64, one per layer). ``method``: "auto", "primal" or "dual" (same result)."""
        if method not in ("auto", "primal", "dual"):
            raise ValueError(f"method must be auto, primal or dual, got {method!r}")
        n = self.n_rows
        if n == 0:
            return [w.clone() for w in self.w0]
        if method == "auto":
            method = "dual" if n < self.width else "primal"
        sizes = [w.shape[0] for w in self.w0]
        if method == "primal":
            gram, crosses = self.statistics()
            lhs = gram + self.lam * torch.eye(self.width, dtype=F64, device=self.device)
            rhs = torch.cat([(self.lam * w + x).T for w, x in zip(self.w0, crosses)], dim=1)  # (d, Σ out)
            sol = torch.linalg.solve(lhs, rhs)
            return [part.T.contiguous() for part in sol.split(sizes, dim=1)]
        c, residual = self._dual_residual()  # (n, d), (n, Σ out)
        kernel = c @ c.T + self.lam * torch.eye(n, dtype=F64, device=self.device)
        coef = torch.linalg.solve(kernel, residual)
        return list((self.stacked + coef.T @ c).split(sizes))


    def solve_factors(self, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """The edit as factors: (U (Σ out_l, k), C (k, d)) with W_l = W0_l + U_l C (U_l: layer l's rows of U).

        From the dual solve, k is the number of rows: the change is low rank. Otherwise k = d and C = I.
        """
        n = self.n_rows
        method = ("dual" if n < self.width else "primal") if method == "auto" else method
        if n == 0:
            return (torch.zeros(sum(w.shape[0] for w in self.w0), 0, dtype=F64, device=self.device),
                    torch.zeros(0, self.width, dtype=F64, device=self.device))
        if method == "dual":
            c, residual = self._dual_residual()
            kernel = c @ c.T + self.lam * torch.eye(n, dtype=F64, device=self.device)
            return torch.linalg.solve(kernel, residual).T, c
        new = self.solve(method)
        return torch.cat([a - b for a, b in zip(new, self.w0)]), torch.eye(self.width, dtype=F64, device=self.device)


class LowRankEdits:
    """Layers kept as W_l = W0_l + U_l C (all layers stacked: U is (Σ out_l, m), C is (m, d)), for RECE's epochs.

    Each epoch's ridge solve adds m_e = (number of rows) columns. RECE's adversarial embedding needs
    Σ_l W'_lᵀ W'_l and Σ_l W'_lᵀ W0_l; with the factors these are

        Σ W'ᵀW0 = G0 + S,   Σ W'ᵀW' = G0 + S + Sᵀ + Cᵀ (UᵀU) C,   S = Cᵀ (Uᵀ W0),  G0 = Σ W0ᵀW0,

    so the one product that costs Σ out · d² (G0) is done once instead of twice per epoch: on SD-1.4's 32
    matrices (Σ out = 24,960, d = 768) that is the difference between seconds and a fraction of one on a CPU.
    """

    def __init__(self, original: Sequence[torch.Tensor]):
        self.sizes = [w.shape[0] for w in original]
        self.w0 = torch.cat([w.detach().to(F64) for w in original])  # (Σ out, d)
        self.device, self.width = self.w0.device, self.w0.shape[1]
        self.current = self.w0.clone()
        self.u = torch.zeros(len(self.w0), 0, dtype=F64, device=self.device)
        self.c = torch.zeros(0, self.width, dtype=F64, device=self.device)
        self.r = torch.zeros(0, self.width, dtype=F64, device=self.device)  # Uᵀ W0, (m, d)
        self.q = torch.zeros(0, 0, dtype=F64, device=self.device)  # Uᵀ U, (m, m)
        self._g0: torch.Tensor | None = None

    def layers(self) -> list[torch.Tensor]:
        """The current weights, one (out_l, d) view per layer."""
        return list(self.current.split(self.sizes))

    def add(self, u: torch.Tensor, c: torch.Tensor) -> None:
        """Apply the change W += U C (U: (Σ out, k), C: (k, d))."""
        cross = self.u.T @ u
        self.q = torch.cat([torch.cat([self.q, cross], 1), torch.cat([cross.T, u.T @ u], 1)])
        self.r = torch.cat([self.r, u.T @ self.w0])
        self.u = torch.cat([self.u, u], 1)
        self.c = torch.cat([self.c, c])
        self.current += u @ c

    def adversarial_embedding(self, states: torch.Tensor, reg: float) -> torch.Tensor:
        """Same as `adversarial_embedding` (current vs original weights), from the factors."""
        if not reg > 0:
            raise ValueError(f"reg must be > 0, got {reg}")
        if self._g0 is None:
            self._g0 = self.w0.T @ self.w0
        s = self.c.T @ self.r
        m2 = self._g0 + s
        m1 = m2 + s.T + self.c.T @ self.q @ self.c + reg * torch.eye(self.width, dtype=F64, device=self.device)
        return torch.linalg.solve(m1, m2 @ states.detach().to(device=self.device, dtype=F64).T).T


def objective(weights: Sequence[torch.Tensor], problem: RidgeProblem) -> float:
    """The ridge objective of ``weights`` (for tests and diagnostics)."""
    c, v = problem._stacked()
    total = 0.0
    for w, w0, vl in zip(weights, problem.w0, v):
        w = w.to(F64)
        total += problem.lam * float(((w - w0) ** 2).sum()) + float(((c @ w.T - vl) ** 2).sum())
    return total


def adversarial_embedding(edited: Sequence[torch.Tensor], original: Sequence[torch.Tensor], states: torch.Tensor,
                          reg: float) -> torch.Tensor:
    """RECE's closed-form attack: the token states c' that make the edited layers reproduce what the original
    layers gave for ``states`` (n, d):

        c' = argmin Σ_l ||W'_l c' − W0_l c||² + reg ||c'||²  =  (reg I + Σ_l W'_lᵀ W'_l)⁻¹ (Σ_l W'_lᵀ W0_l) c

    All layers at once: the sums are one product of the stacked matrices. Float64; returns (n, d) float64.
    """
    if not reg > 0:
        raise ValueError(f"reg must be > 0, got {reg}")
    device = edited[0].device
    we = torch.cat([w.detach().to(device=device, dtype=F64) for w in edited])  # (Σ out, d)
    wo = torch.cat([w.detach().to(device=device, dtype=F64) for w in original])
    both = we.T @ torch.cat([we, wo], dim=1)  # (d, 2d): [Σ W'ᵀW', Σ W'ᵀW0] in one product
    d = we.shape[1]
    lhs = both[:, :d] + reg * torch.eye(d, dtype=F64, device=device)
    rhs = both[:, d:] @ states.detach().to(device=device, dtype=F64).T  # (d, n)
    return torch.linalg.solve(lhs, rhs).T

"""The shared closed-form ridge solver and RECE's adversarial embedding against direct least squares."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from erasekit.erasers.ridge import RidgeProblem, adversarial_embedding, objective

F64 = torch.float64


def lstsq_reference(problem: RidgeProblem) -> list[torch.Tensor]:
    """Each layer as one stacked least-squares system: [C; √λ I] Wᵀ = [V; √λ W0ᵀ]."""
    c, v = problem._stacked()
    d = problem.width
    a = torch.cat([c, problem.lam**0.5 * torch.eye(d, dtype=F64)])
    out = []
    for w0, vl in zip(problem.w0, v):
        b = torch.cat([vl, problem.lam**0.5 * w0.T])
        out.append(torch.linalg.lstsq(a, b, driver="gelsd").solution.T)
    return out


def random_problem(seed, d, outs, blocks, lam, collinear=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o, d, generator=g, dtype=torch.float32) for o in outs]
    problem = RidgeProblem(weights, lam)
    for n, s in blocks:
        c = torch.randn(n, d, generator=g, dtype=F64) * scale
        if collinear and n > 1:  # rows that are nearly copies of each other: a near-singular Gram matrix
            c = c[:1].repeat(n, 1) + 1e-9 * torch.randn(n, d, generator=g, dtype=F64)
        problem.add(c, [torch.randn(n, o, generator=g, dtype=F64) for o in outs], s)
    return problem


def assert_close_or_as_good(problem, ours, ref, rtol=1e-7, obj_rtol=1e-9):
    """Equal to the reference, or (ill-conditioned cases, where W is determined only loosely) as good a minimiser
    of the ridge objective, up to ``obj_rtol``."""
    f_ours, f_ref = objective(ours, problem), objective(ref, problem)
    assert f_ours <= f_ref * (1 + obj_rtol) + 1e-12
    for a, b in zip(ours, ref):
        scale = b.abs().max().item() + 1e-12
        if (a - b).abs().max().item() > rtol * scale * 1e3:
            assert abs(f_ours - f_ref) <= obj_rtol * max(f_ref, 1e-12)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    d=st.integers(1, 24),
    outs=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    blocks=st.lists(st.tuples(st.integers(0, 30), st.sampled_from([0.0, 0.1, 1.0, 3.0])), min_size=0, max_size=3),
    lam=st.sampled_from([1e-6, 1e-3, 0.1, 0.5, 10.0]),
    method=st.sampled_from(["auto", "primal", "dual"]),
)
def test_solver_matches_lstsq(seed, d, outs, blocks, lam, method):
    problem = random_problem(seed, d, outs, blocks, lam)
    ours = problem.solve(method)
    assert all(w.dtype == F64 and w.shape == w0.shape for w, w0 in zip(ours, problem.w0))
    assert_close_or_as_good(problem, ours, lstsq_reference(problem))


@pytest.mark.parametrize("method", ["primal", "dual"])
@pytest.mark.parametrize("lam", [1e-8, 1e-4])
def test_solver_near_singular(method, lam):
    """Nearly collinear rows (and more unknowns than rows): the Gram matrix is singular up to λ (condition number
    ~1e13 at λ = 1e-8). The float64 solve stays finite and within 1e-5 of the best objective (a half-precision
    inverse, as in the official UCE code, returns garbage here)."""
    problem = random_problem(3, 48, [16, 32], [(10, 1.0), (5, 0.1)], lam, collinear=True, scale=30.0)
    ours = problem.solve(method)
    assert all(torch.isfinite(w).all() for w in ours)
    assert_close_or_as_good(problem, ours, lstsq_reference(problem), obj_rtol=1e-5)


def test_primal_and_dual_agree_and_statistics():
    problem = random_problem(7, 64, [32, 16, 32], [(12, 1.0), (40, 0.5), (20, 2.0)], 0.5)
    p, q = problem.solve("primal"), problem.solve("dual")
    for a, b in zip(p, q):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    gram, crosses = problem.statistics()
    c, v = problem._stacked()
    torch.testing.assert_close(gram, c.T @ c)
    assert [x.shape for x in crosses] == [w.shape for w in problem.w0]


def test_no_rows_returns_the_original_and_bad_inputs():
    w = [torch.randn(4, 3)]
    problem = RidgeProblem(w, 0.5)
    torch.testing.assert_close(problem.solve()[0], w[0].double())
    with pytest.raises(ValueError):
        RidgeProblem(w, 0.0)
    with pytest.raises(ValueError):
        RidgeProblem([torch.randn(4, 3), torch.randn(4, 5)], 0.5)
    with pytest.raises(ValueError):
        problem.add(torch.randn(2, 3), [torch.randn(2, 5)])
    with pytest.raises(ValueError):
        problem.solve("inverse")


def test_mapping_rows_are_w0_times_source():
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g)]
    a, b = RidgeProblem(w, 0.3), RidgeProblem(w, 0.3)
    c, s = torch.randn(4, 8, generator=g, dtype=F64), torch.randn(4, 8, generator=g, dtype=F64)
    a.add_mapping(c, s, 2.0)
    b.add(c, [s @ x.double().T for x in w], 2.0)
    for x, y in zip(a.solve(), b.solve()):
        torch.testing.assert_close(x, y)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(1, 16), n=st.integers(1, 6),
       outs=st.lists(st.integers(1, 10), min_size=1, max_size=4), reg=st.sampled_from([1e-6, 1e-3, 0.1, 1.0]))
def test_adversarial_embedding_matches_lstsq(seed, d, n, outs, reg):
    g = torch.Generator().manual_seed(seed)
    original = [torch.randn(o, d, generator=g, dtype=F64) for o in outs]
    edited = [w + 0.5 * torch.randn(w.shape, generator=g, dtype=F64) for w in original]
    c = torch.randn(n, d, generator=g, dtype=F64)
    ours = adversarial_embedding(edited, original, c, reg)
    # min_x Σ_l ||W'_l x − W0_l c||² + reg ||x||²  as one stacked system, per token
    a = torch.cat(edited + [reg**0.5 * torch.eye(d, dtype=F64)])
    b = torch.cat([c @ w.T for w in original] + [torch.zeros(n, d, dtype=F64)], dim=1).T
    ref = torch.linalg.lstsq(a, b, driver="gelsd").solution.T
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6 * (1 + ref.abs().max().item()))


@pytest.mark.parametrize("method", ["dual", "primal"])
def test_factor_solves_and_low_rank_bookkeeping_match_dense(method):
    """RECE's factored path (W = W0 + U C, sums from factors) equals the dense computation."""
    from erasekit.erasers.ridge import LowRankEdits

    g = torch.Generator().manual_seed(11)
    d, outs = 24, [8, 16, 8]
    original = [torch.randn(o, d, generator=g, dtype=F64) for o in outs]
    model = LowRankEdits(original)
    states = torch.randn(5, d, generator=g, dtype=F64)
    for step in range(3):
        n = 6 if method == "dual" else 30
        problem = RidgeProblem(model.layers(), 0.3)
        problem.add_mapping(torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, d, generator=g, dtype=F64), 1.0)
        dense = problem.solve(method)
        model.add(*problem.solve_factors(method))
        for a, b in zip(model.layers(), dense):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(model.adversarial_embedding(states, 0.05),
                                   adversarial_embedding(model.layers(), original, states, 0.05), rtol=1e-8, atol=1e-9)

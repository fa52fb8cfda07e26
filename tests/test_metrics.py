"""CRR and Wilson intervals (properties, known values) and the cost meter."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erasekit.metrics import concept_reproduction_rate, crr_summary, measure_cost, wilson_interval


@st.composite
def counts(draw, max_n=10_000):
    n = draw(st.integers(0, max_n))
    return draw(st.integers(0, n)), n


def test_known_values():
    # Reference values (e.g. statsmodels proportion_confint(method="wilson")).
    low, high = wilson_interval(80, 100)
    assert low == pytest.approx(0.71117, abs=1e-5) and high == pytest.approx(0.86663, abs=1e-5)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.27753, abs=1e-5)
    assert wilson_interval(10, 10) == (pytest.approx(0.72247, abs=1e-5), 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


@given(counts())
def test_interval_contains_the_rate_and_stays_in_0_1(kn):
    k, n = kn
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= high <= 1.0
    if n:
        assert low <= k / n <= high
        assert (low == 0.0) == (k == 0) and (high == 1.0) == (k == n)


@given(counts())
def test_interval_is_symmetric_in_success_and_failure(kn):
    k, n = kn
    low, high = wilson_interval(k, n)
    flow, fhigh = wilson_interval(n - k, n)
    assert low == pytest.approx(1 - fhigh, abs=1e-12) and high == pytest.approx(1 - flow, abs=1e-12)


@given(counts(max_n=2000))
def test_interval_moves_up_with_successes(kn):
    k, n = kn
    if k < n:
        a, b = wilson_interval(k, n), wilson_interval(k + 1, n)
        assert b[0] >= a[0] and b[1] >= a[1]


# Integer strategies only: conftest flushes denormals, which hypothesis' float strategies refuse.
@given(counts(max_n=500))
def test_interval_narrows_with_more_images_at_the_same_rate(kn):
    k, n = kn
    low1, high1 = wilson_interval(k, n)
    low4, high4 = wilson_interval(4 * k, 4 * n)
    assert high4 - low4 <= high1 - low1 + 1e-12


@given(counts(max_n=500), st.sampled_from([0.5, 0.9, 0.99]))
def test_higher_confidence_is_wider(kn, conf):
    k, n = kn
    low, high = wilson_interval(k, n, conf)
    wlow, whigh = wilson_interval(k, n, min(0.999, conf + 0.005))
    assert wlow <= low + 1e-12 and whigh >= high - 1e-12


@settings(max_examples=50)
@given(st.lists(st.booleans(), max_size=300))
def test_summary_matches_flags(flags):
    s = crr_summary(flags)
    assert s["n"] == len(flags) and s["k"] == sum(flags)
    assert s["ci"] == list(wilson_interval(sum(flags), len(flags)))
    if flags:
        assert s["crr"] == pytest.approx(sum(flags) / len(flags)) == concept_reproduction_rate(flags)
    else:
        assert s["crr"] is None and math.isnan(concept_reproduction_rate(flags))


@pytest.mark.parametrize("k, n", [(-1, 5), (6, 5), (1, -1), (1.5, 3), (True, 3)])
def test_bad_counts(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def test_bad_confidence():
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=1.0)


def test_measure_cost_records_time_memory_and_images():
    import time

    with measure_cost(step="test") as cost:
        block = bytearray(50 * 2**20)  # touch 50 MB
        block[:: 4096] = b"x" * len(block[:: 4096])
        time.sleep(0.05)
        cost.add_images(7)
    d = cost.as_dict()
    assert d["wall_s"] >= 0.05 and d["cpu_s"] >= 0 and d["images"] == 7 and d["step"] == "test"
    assert d["peak_rss_mb"] is not None and d["peak_rss_mb"] >= 50
    assert d["rss_scope"] in ("block", "process") and d["cuda_peak_mb"] is None


def test_measure_cost_fills_in_when_the_block_raises():
    with pytest.raises(RuntimeError):
        with measure_cost() as cost:
            raise RuntimeError("boom")
    assert cost.wall_s > 0


def test_nested_cost_blocks_keep_the_outer_peak():
    import numpy as np

    from erasekit.metrics.cost import measure_cost

    with measure_cost() as outer:
        big = np.ones(200 * 2**20 // 8)  # 200 MB, touched
        big[::512] = 2.0
        del big
        with measure_cost() as inner:
            small = np.ones(2**20)
            del small
    if outer.rss_scope == "block":
        # The inner block reset the counters, yet the outer block still sees the 200 MB it held before.
        assert outer.peak_rss_mb >= inner.peak_rss_mb + 150


class _FaultedCuda:
    """A CUDA whose context holds a sticky fault: every synchronize raises it again."""

    def synchronize(self):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def reset_peak_memory_stats(self):
        pass

    def max_memory_allocated(self):
        return 0


def test_measure_cost_lets_the_blocks_own_error_through_a_faulted_synchronize(monkeypatch):
    import erasekit.metrics.cost as cost

    monkeypatch.setattr(cost, "_cuda", lambda: _FaultedCuda())
    with pytest.raises(ValueError, match="where it happened"):
        with cost.measure_cost():
            raise ValueError("where it happened")
    # a fault that only the synchronize sees (the block itself ran) still raises
    with pytest.raises(RuntimeError, match="illegal memory access"):
        with cost.measure_cost():
            pass

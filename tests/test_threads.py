"""Thread count: chosen from the free cores, or set by --threads / ERASEKIT_THREADS; recorded in the costs."""

import pytest
from typer.testing import CliRunner

from erasekit import threads
from erasekit.errors import ErasekitError


def test_auto_leaves_the_busy_cores_alone():
    assert threads.auto_threads(2, 1.0) == 1  # one core kept busy by another process: one thread, not two
    assert threads.auto_threads(2, 0.1) == 2
    assert threads.auto_threads(8, 3.4) == 5
    assert threads.auto_threads(4, 9.0) == 1  # overloaded: never zero
    assert threads.auto_threads(4, None) == 4  # no load average (other systems): every core


def test_precedence_option_then_env_then_omp_then_auto():
    env = {"ERASEKIT_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert threads.choose("2", env, cores=8, load=0.0) == (2, "--threads")
    assert threads.choose(None, env, cores=8, load=0.0) == (3, "ERASEKIT_THREADS")
    assert threads.choose(None, {"OMP_NUM_THREADS": "5"}, cores=8, load=0.0) == (5, "OMP_NUM_THREADS")
    assert threads.choose(None, {}, cores=8, load=2.0) == (6, "auto")
    assert threads.choose("auto", env, cores=8, load=2.0) == (3, "ERASEKIT_THREADS")  # auto defers to the env
    assert threads.choose(None, {"ERASEKIT_THREADS": "auto"}, cores=2, load=1.0) == (1, "auto")


@pytest.mark.parametrize("bad", ["0", "-1", "abc", "1.5", "100000", "nan"])
def test_bad_counts_are_refused(bad):
    with pytest.raises(ErasekitError):
        threads.parse(bad, "--threads")
    with pytest.raises(ErasekitError, match="ERASEKIT_THREADS"):
        threads.choose(None, {"ERASEKIT_THREADS": bad}, cores=2, load=0.0)


def test_available_cores_follows_affinity(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert threads.available_cores() == 3


def test_apply_sets_torch_and_cost_records_it(monkeypatch):
    import torch

    from erasekit.metrics.cost import measure_cost

    before = torch.get_num_threads()
    monkeypatch.setenv("ERASEKIT_THREADS", "1")
    monkeypatch.setattr(threads, "_requested", None)
    try:
        assert threads.apply()["threads"] == 1 and torch.get_num_threads() == 1
        with measure_cost() as cost:
            pass
        row = cost.as_dict()
        assert row["threads"] == 1 and row["threads_source"] == "ERASEKIT_THREADS"
    finally:
        torch.set_num_threads(before)
        monkeypatch.setattr(threads, "_chosen", None)


def test_cli_threads_option_is_checked_and_applied(monkeypatch):
    from erasekit.cli import app

    monkeypatch.setattr(threads, "_requested", None)
    result = CliRunner().invoke(app, ["--threads", "0", "ls"])
    assert result.exit_code == 2 and result.stderr.strip().startswith("error: --threads=0")
    result = CliRunner().invoke(app, ["--threads", "1", "ls"])
    assert result.exit_code == 0 and threads._requested == "1"
    monkeypatch.setattr(threads, "_requested", None)

"""Crash tests (issue #14): SIGKILL `erasekit generate` / `erasekit attack` at seeded random points, resume, and
check that nothing is lost, duplicated or corrupted and that the images equal an uninterrupted run's.

Each command runs as a subprocess (the toy model: a few seconds per process). A kill point is an event to wait
for (the process started; k PNGs exist; a cache file exists), then a seeded random delay, then SIGKILL. Kills are
chained: every run resumes from what the previous killed run left, and a last run completes. The report of every
test (what was on disk at each kill) is printed; run with ``-s`` to see it.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erasekit.image_store import INDEX_FILE, STORE_NAME_RE, read_index
from erasekit.jsonl import scan_jsonl

ERASEKIT = [str(Path(sys.executable).with_name("erasekit"))]
if not Path(ERASEKIT[0]).is_file():
    ERASEKIT = [sys.executable, "-m", "erasekit"]
GENERATE = ["generate", "a red star", "a blue heart", "--model", "toy", "-n", "12", "--batch-size", "4"]
ATTACK = ["attack", "--scenario", "latent-bb", "--concept", "star", "--model", "toy", "-n", "8"]
POLL_S = 0.005
RUN_TIMEOUT_S = 240


def _env():
    # One torch thread: on a shared 2-core machine a second thread makes every op wait for the busy core (5x slower
    # runs were measured); the reference and the killed runs must also use the same threads to compare pixels.
    return dict(os.environ, TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error", PYTHONUNBUFFERED="1",
                OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _run(args, out: Path) -> float:
    t = time.monotonic()
    proc = subprocess.run(ERASEKIT + args + ["--out", str(out)], capture_output=True, text=True, env=_env(),
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.monotonic() - t


def _pngs(out: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(out) if STORE_NAME_RE.match(n))
    except FileNotFoundError:
        return []


def _kill_when(args, out: Path, ready, delay: float) -> tuple[bool, float]:
    """Start the command, wait until ``ready(out, pid)`` holds, sleep ``delay``, SIGKILL it; returns whether it was
    killed (False: it finished first) and the seconds it ran."""
    t = time.monotonic()
    proc = subprocess.Popen(ERASEKIT + args + ["--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not ready(out, proc.pid) and proc.poll() is None:
            assert time.monotonic() < deadline, "the command neither reached the kill point nor finished"
            time.sleep(POLL_S)
        time.sleep(delay)
        if proc.poll() is not None:
            return False, time.monotonic() - t
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True, time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _holds(out: Path, pid: int) -> bool:
    """The run ``pid`` holds ``out``'s lock (past start-up: the CLI takes it before loading the model)."""
    from erasekit.folder_lock import lock_holder

    return lock_holder(out) == pid


def _state(out: Path) -> dict:
    """What is on disk: PNGs, index rows, rows whose PNG is missing, PNGs without a row, unreadable lines."""
    scan = scan_jsonl(out / INDEX_FILE)
    rows = [r.get("path") for r in scan.records]
    pngs = _pngs(out)
    return {"pngs": len(pngs), "rows": len(rows), "rows_without_png": len(set(rows) - set(pngs)),
            "orphan_pngs": len(set(pngs) - set(rows)), "bad_lines": len(scan.bad_lines)}


def _pixels(out: Path) -> dict[str, np.ndarray]:
    return {name: np.asarray(Image.open(out / name).convert("RGB")) for name in _pngs(out)}


def _check_complete(out: Path, reference: dict[str, np.ndarray], n_expected: int, exact: bool = True) -> dict:
    scan = scan_jsonl(out / INDEX_FILE)
    assert scan.clean, scan.bad_lines  # every index line parses
    keys = [r["key"] for r in scan.records]
    assert len(keys) == len(set(keys)) == n_expected  # every image listed exactly once
    done = read_index(out)
    pngs = _pngs(out)
    assert sorted(r["path"] for r in done.values()) == pngs  # one PNG per row, none unlisted
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    got = _pixels(out)
    assert sorted(got) == sorted(reference)  # same images (names carry the record key)
    diffs = {n: int(np.abs(got[n].astype(int) - reference[n].astype(int)).max()) for n in got}
    if exact:
        assert max(diffs.values()) == 0, {n: d for n, d in diffs.items() if d}
    else:
        # Regenerated in a batch of another size: the CPU's batched kernels may move a pixel by one level
        # (see erasekit.generation).
        assert max(diffs.values()) <= 1, diffs
    return {"images": len(got), "differing_images": sum(d > 0 for d in diffs.values()),
            "max_level_difference": max(diffs.values())}


@pytest.fixture(scope="module")
def generate_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("crash") / "reference"
    wall = _run(GENERATE, out)
    return out, _pixels(out), wall


def test_generate_survives_sigkill(generate_reference, tmp_path):
    ref_out, reference, wall = generate_reference
    assert len(reference) == 24
    rng = random.Random(14)
    out = tmp_path / "D"
    # Kill points: during start-up (before any image), then after 0..23 PNGs exist, each plus a random delay.
    points = [("start-up", lambda o, pid: True, rng.uniform(0.5, 3.0)),
              ("holds the folder lock", _holds, rng.uniform(0.0, 2.0))]
    for target in sorted(rng.sample(range(1, 24), 3)):
        points.append((f">= {target} PNGs", lambda o, pid, t=target: len(_pngs(o)) >= t, rng.uniform(0.0, 0.25)))
    report = []
    for name, ready, delay in points:
        killed, ran = _kill_when(GENERATE, out, ready, delay)
        state = _state(out)
        report.append({"kill_point": name, "delay_s": round(delay, 3), "killed": killed, "ran_s": round(ran, 1),
                       **state})
        assert state["rows_without_png"] == 0 and state["bad_lines"] == 0, report
    final_s = _run(GENERATE, out)
    result = _check_complete(out, reference, 24)
    print(json.dumps({"command": "generate", "reference_wall_s": round(wall, 1), "kills": report,
                      "final_run_s": round(final_s, 1), "final": result}, indent=1))
    assert sum(r["killed"] for r in report) >= 4  # the kill points were actually hit


def test_generate_torn_index_line(generate_reference, tmp_path):
    """The issue's scenario: cut the index's last line mid-record, rerun."""
    import shutil

    ref_out, reference, _ = generate_reference
    out = tmp_path / "D"
    shutil.copytree(ref_out, out)
    index = out / INDEX_FILE
    data = index.read_bytes()
    last = data.rindex(b"\n", 0, len(data) - 1) + 1
    index.write_bytes(data[: last + random.Random(14).randrange(1, len(data) - last - 1)])
    assert _state(out)["bad_lines"] == 1 and _state(out)["orphan_pngs"] == 1
    _run(GENERATE, out)
    result = _check_complete(out, reference, 24, exact=False)
    print(json.dumps({"command": "generate, torn last index line", "final": result}))


def test_attack_survives_sigkill(tmp_path):
    import shutil

    fresh_out = tmp_path / "fresh"
    wall = _run(ATTACK, fresh_out)
    fresh = _pixels(fresh_out)
    assert len(fresh) == 8
    # The killed runs below generate from the inversion cached by an earlier run (a kill point comes after the
    # cache is written): the reference does the same. (Fresh and cached latents can differ in the last float bit
    # and move a pixel by one level: compared below and reported, not asserted.)
    reference_out = tmp_path / "reference"
    reference_out.mkdir()
    shutil.copytree(fresh_out / "cache", reference_out / "cache")
    _run(ATTACK, reference_out)
    reference = _pixels(reference_out)
    fresh_vs_cached = max(int(np.abs(fresh[n].astype(int) - reference[n].astype(int)).max()) for n in reference)
    rng = random.Random(1414)
    out = tmp_path / "D"

    def cached(o):
        return any(p.suffix == ".json" for p in (o / "cache").glob("inverted-*"))

    # Events of the run being killed (it holds the folder's lock), then a seeded delay.
    points = [
        ("start-up", lambda o, pid: True, rng.uniform(0.5, 3.0)),
        ("loading / inverting", _holds, rng.uniform(0.0, 2.0)),
        ("inversion cached", lambda o, pid: _holds(o, pid) and cached(o), rng.uniform(0.0, 0.5)),
        ("first image written", lambda o, pid: _holds(o, pid) and len(_pngs(o)) >= 1, rng.uniform(0.0, 0.05)),
        ("scoring / summary", _holds, rng.uniform(2.5, 4.5)),
    ]
    report = []
    for name, ready, delay in points:
        killed, ran = _kill_when(ATTACK, out, ready, delay)
        state = _state(out)
        report.append({"kill_point": name, "delay_s": round(delay, 3), "killed": killed, "ran_s": round(ran, 1),
                       **state})
        assert state["rows_without_png"] == 0 and state["bad_lines"] == 0, report
        for f in ("summary.json", "scores.jsonl"):
            if (out / f).is_file():  # written whole or not at all
                text = (out / f).read_text()
                json.loads(text) if f.endswith(".json") else [json.loads(x) for x in text.splitlines()]
    final_s = _run(ATTACK, out)
    result = _check_complete(out, reference, 8)
    summary = json.loads((out / "summary.json").read_text())
    ref_summary = json.loads((reference_out / "summary.json").read_text())
    assert summary["crr"] == ref_summary["crr"] and summary["n"] == ref_summary["n"] == 8
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 8 and len({s["key"] for s in scores}) == 8
    print(json.dumps({"command": "attack", "reference_wall_s": round(wall, 1), "kills": report,
                      "final_run_s": round(final_s, 1), "final": result,
                      "fresh_vs_cached_inversion_max_level_difference": fresh_vs_cached}, indent=1))
    assert sum(r["killed"] for r in report) >= 3

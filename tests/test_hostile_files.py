"""Hostile and broken files (issue #18, part B): broken models never read as perfect erasers, a run deletes
nothing it did not write, two bench runs never share a folder, no write goes through a symbolic link, full disks
and odd files end in one line, stale temporary files are cleared.

Every test here failed before its fix (the issue's reproduction, shrunk to the tiny toy settings)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.errors import ErasekitError

FAST = ["--steps", "2"]


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output
    return lines[0]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- item 6: a run deletes nothing it did not write; --out '' is refused ------------------------------------------
def test_generate_keeps_pngs_the_index_does_not_list(tmp_path):
    out = tmp_path / "X"
    assert _cli("generate", "a star", "-n", "2", "--out", out, *FAST).exit_code == 0
    stars = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert len(stars) == 2
    (out / "images.jsonl").rename(tmp_path / "images.jsonl")  # the user moves the index away
    result = _cli("generate", "a heart", "-n", "1", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    left = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert set(stars) <= set(left) and len(left) == 3  # before: both star PNGs were deleted as "orphans"


@pytest.mark.parametrize("command", [
    ["generate", "a star", "-n", "1"],
    ["attack", "--scenario", "text", "--concept", "star", "-n", "1"],
    ["erase", "--method", "uce", "--concept", "star"],
    ["bench"],
])
def test_empty_out_is_refused(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine_seed0_0123abcd.png").write_bytes(b"user file")
    result = _cli(*command, "--out", "")
    assert result.exit_code == 2 and "--out" in result.output and "empty" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine_seed0_0123abcd.png"]  # nothing written here


# -- item 7: two bench configs never share a folder ----------------------------------------------------------------
TINY = {
    "model": "toy",
    "concepts": ["star"],
    "methods": ["original"],
    "scenarios": ["text"],
    "images_per_cell": 2,
    "sampler": {"steps": 2},
    "preservation": {"images": 2},
    "batch_size": 2,
}


def test_bench_checks_the_folder_under_its_lock(tmp_path, monkeypatch):
    """Run B checks a new folder, then (while it loads its model) run A takes the folder and writes its config:
    B must refuse once it holds the lock. Before, B's check ran only before the lock and B wrote its rows under
    A's config."""
    from erasekit.bench import run as bench_run
    from erasekit.bench.spec import parse_config

    out = tmp_path / "shared"
    cfg_a = parse_config(dict(TINY, seed=1))
    cfg_b = parse_config(dict(TINY, seed=2))
    load = bench_run._load

    def load_while_a_takes_the_folder(cfg, device):
        target = load(cfg, device)
        out.mkdir(exist_ok=True)
        bench_run.write_config(out, cfg_a)  # what run A does meanwhile
        return target

    monkeypatch.setattr(bench_run, "_load", load_while_a_takes_the_folder)
    with pytest.raises(ErasekitError, match="another bench config"):
        bench_run.run_bench(cfg_b, out, progress=False, log=lambda m: None)
    assert json.loads((out / "config.json").read_text())["config_key"] == bench_run.config_key(cfg_a)
    assert not (out / "results.jsonl").exists() and not (out / "costs.jsonl").exists()


def test_two_bench_processes_started_together(tmp_path):
    """The issue's race, for real: two `erasekit bench` processes with different configs on one new folder. One
    may finish; the other must fail with one line (the folder's lock, or another config), and the folder holds one
    config's results."""
    import yaml

    out = tmp_path / "race"
    procs = []
    for seed in (1, 2):
        cfg = tmp_path / f"c{seed}.yaml"
        cfg.write_text(yaml.safe_dump(dict(TINY, seed=seed)))
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", ERASEKIT_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "erasekit", "bench", "--preset", str(cfg), "--out",
                                       str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    failed = [err for rc, err in results if rc == 2][0]
    assert failed.strip().splitlines()[-1].startswith("error: "), failed
    saved = json.loads((out / "config.json").read_text())
    seeds = {r["seed"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())
             if r["kind"] == "attack"}
    assert saved["config"]["seed"] in (1, 2) and seeds == {saved["config"]["seed"], saved["config"]["seed"] + 1}


# -- item 8: no write through a symbolic link ----------------------------------------------------------------------
def test_lock_file_link_is_refused_and_its_target_untouched(tmp_path):
    from erasekit.folder_lock import LOCK_FILE, hold_folder

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).symlink_to(victim)
    with pytest.raises(ErasekitError, match="symbolic link"):
        with hold_folder(out):
            pass
    assert victim.read_text() == "precious"  # before: truncated (and a pid written into it)
    result = _cli("generate", "a star", "-n", "1", "--out", out, *FAST)
    _one_line_error(result, "symbolic link")
    assert victim.read_text() == "precious"


def test_index_link_is_refused_and_its_target_untouched(tmp_path):
    out = tmp_path / "out"
    assert _cli("generate", "a star", "-n", "1", "--out", out, *FAST).exit_code == 0
    victim = tmp_path / "victim.jsonl"
    victim.write_bytes(b'{"mine": 1}\n{"mine": 2, "torn')
    (out / "images.jsonl").unlink()
    (out / "images.jsonl").symlink_to(victim)
    before = victim.read_bytes()
    _one_line_error(_cli("generate", "a heart", "-n", "1", "--out", out, *FAST), "symbolic link")
    assert victim.read_bytes() == before  # before: its last line cut and a row appended
    from erasekit.jsonl import append_jsonl

    with pytest.raises(ErasekitError, match="symbolic link"):
        append_jsonl(out / "images.jsonl", [{"a": 1}])
    assert victim.read_bytes() == before


def test_report_file_links_are_never_written_through(tmp_path):
    """A link in report/ (a plot, a grid, report/grids itself) or at a replaced file: its target keeps its bytes."""
    from erasekit.atomic import atomic_write_bytes
    from erasekit.folder_lock import hold_folder

    victim = tmp_path / "victim.png"
    victim.write_bytes(b"not a png")
    out = tmp_path / "out"
    (out / "report").mkdir(parents=True)
    (out / "report" / "crr_by_scenario.png").symlink_to(victim)
    with pytest.raises(ErasekitError, match="crr_by_scenario.png is a symbolic link"):
        with hold_folder(out):
            pass
    # Even without the lock's check, a whole-file write replaces the link and leaves its target alone.
    atomic_write_bytes(out / "report" / "crr_by_scenario.png", b"PNG bytes")
    assert victim.read_bytes() == b"not a png"
    assert (out / "report" / "crr_by_scenario.png").read_bytes() == b"PNG bytes"
    # A link planted under the temporary file's (predictable) name is not written through either.
    target = out / "summary.json"
    tmp = target.with_name(f".summary.json.{os.getpid()}.tmp")
    tmp.symlink_to(victim)
    atomic_write_bytes(target, b"{}")
    assert victim.read_bytes() == b"not a png" and target.read_bytes() == b"{}"
    grids = tmp_path / "elsewhere"
    grids.mkdir()
    (out / "report" / "crr_by_scenario.png").unlink()
    (out / "report" / "grids").symlink_to(grids, target_is_directory=True)
    with pytest.raises(ErasekitError, match="grids is a symbolic link"):
        with hold_folder(out):
            pass


def test_bench_report_link_refused_before_any_work(tmp_path):
    import yaml

    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep")
    out = tmp_path / "out"
    (out / "report" / "grids").mkdir(parents=True)
    (out / "report" / "grids" / "cell.png").symlink_to(victim)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    from erasekit.bench.run import write_config
    from erasekit.bench.spec import parse_config

    write_config(out, parse_config(TINY))  # a run of this config to resume
    _one_line_error(_cli("bench", "--preset", cfg, "--out", out, "--no-progress"), "cell.png is a symbolic link")
    assert victim.read_bytes() == b"keep" and not (out / "results.jsonl").exists()


# -- item 12: stale temporary files are cleared when a run takes the folder ---------------------------------------
def test_stale_temp_files_cleared_under_the_lock(tmp_path):
    from erasekit.folder_lock import hold_folder

    dead, live = _dead_pid(), os.getpid()
    out = tmp_path / "run"
    stale = [out / "cache" / f".inverted-0123.json.{dead}.tmp", out / "images" / "ab" / f".abcd.png.{dead}.tmp",
             out / "report" / "grids" / f".cell.png.{dead}.tmp", out / f".images.jsonl.{dead}.tmp",
             out / "cache" / "edits" / "uce-01" / f".edit.safetensors.{dead}.tmp"]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = [out / "images" / "ab" / f".efgh.png.{sleeper.pid}.tmp",  # a process still writing
                out / "images" / "ab" / "notes.tmp"]  # not erasekit's naming
        for p in stale + kept:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
        old = out / "images" / "ab" / f".old.png.{live}.tmp"  # our pid, reused, and days old
        old.write_bytes(b"x")
        os.utime(old, (1e9, 1e9))
        with hold_folder(out):
            assert not any(p.exists() for p in stale + [old]), [p for p in stale if p.exists()]
            assert all(p.exists() for p in kept)
    finally:
        sleeper.kill()
        sleeper.wait()

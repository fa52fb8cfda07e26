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


def _one_line_error(result, *fragments, info: str = "\0"):
    """Exit 2 and one ``error:`` line (beside lines starting with ``info``: a resumed bench says so first)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    # What a terminal shows: each line after its last carriage return (a cleared progress bar leaves only those).
    lines = [line.split("\r")[-1] for line in result.output.split("\n")]
    lines = [line for line in lines if line.strip() and not line.startswith(info)]
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
    assert result.exit_code == 2 and "--out" in result.output and "current folder" in result.output, result.output
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

    def load_while_a_takes_the_folder(cfg, device, pipeline=None):
        target = load(cfg, device, pipeline)
        out.mkdir(exist_ok=True)
        bench_run.write_config(out, cfg_a)  # what run A does meanwhile
        return target

    monkeypatch.setattr(bench_run, "_load", load_while_a_takes_the_folder)
    with pytest.raises(ErasekitError, match="another bench config"):
        bench_run.run_bench(cfg_b, out, progress=False, log=lambda m: None)
    assert json.loads((out / "config.json").read_text())["config_key"] == bench_run.config_key(cfg_a)
    assert not (out / "results.jsonl").exists() and not (out / "costs.jsonl").exists()


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
    from erasekit.atomic import atomic_write
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
    atomic_write(out / "report" / "crr_by_scenario.png", lambda tmp: tmp.write_bytes(b"PNG bytes"))
    assert victim.read_bytes() == b"not a png"
    assert (out / "report" / "crr_by_scenario.png").read_bytes() == b"PNG bytes"
    # A link planted under the temporary file's (predictable) name is not written through either.
    target = out / "summary.json"
    tmp = target.with_name(f".summary.json.{os.getpid()}.tmp")
    tmp.symlink_to(victim)
    atomic_write(target, lambda tmp: tmp.write_bytes(b"{}"))
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
    from erasekit.bench.layout import write_config
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


# -- item 5: a broken model never reads as a perfect eraser ------------------------------------------------------
def test_erase_refuses_non_finite_weights_and_saves_nothing(tmp_path):
    """The issue's command: ESD-x at lr=1e30 made every weight NaN and exited 0."""
    out = tmp_path / "e"
    result = _cli("erase", "--method", "esd-x", "--concept", "star", "--set", "lr=1e30", "--set", "iterations=2",
                  "--set", "trajectories=1", "--set", "ddim_steps=4", "--no-preserve", "--out", out, "-q")
    _one_line_error(result, "non-finite weights", "nothing was saved")
    assert not (out / "edit.json").exists() and not (out / "edit.safetensors").exists()


def _nan_edit(pipe, folder: Path, check: bool = True):
    """A saved edit whose one tensor (the first cross-attention key) is all NaN."""
    import torch

    from erasekit.erasers.base import WeightEdit
    from erasekit.models import fingerprint
    from erasekit.models.cross_attention import cross_attention_kv

    name = "unet." + cross_attention_kv(pipe.unet)[0][0] + ".weight"
    weight = pipe.unet.get_parameter(name[len("unet."):])
    edit = WeightEdit(method="uce", tensors={name: torch.full_like(weight, float("nan"))}, settings={},
                      spec={"concepts": ["star"]}, base_fingerprint=fingerprint(pipe))
    edit.save(folder)
    return edit


def test_nan_edit_is_refused_where_it_is_loaded(toy_random, tmp_path):
    from erasekit.erasers import load_edit

    _nan_edit(toy_random, tmp_path / "bad")
    with pytest.raises(ErasekitError, match="non-finite weights"):
        load_edit(tmp_path / "bad")
    _one_line_error(_cli("attack", "--scenario", "text", "--concept", "star", "-n", "2", "--edit", tmp_path / "bad",
                         "--out", tmp_path / "atk", *FAST), "non-finite weights")


def test_nan_model_folder_is_refused(tiny_sd1, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sd1"
    tiny_sd1.save_pretrained(folder)
    [weights] = (folder / "unet").glob("*.safetensors")
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("inf"))
    save_file(tensors, str(weights))
    _one_line_error(_cli("generate", "a cat", "-n", "1", "--model", folder, "--out", tmp_path / "g", *FAST,
                         "--device", "cpu"), "non-finite weights")


def test_degenerate_images_are_invalid_not_absent(tmp_path, monkeypatch):
    """An edit that slipped through (made by an older erasekit): its black images were scored CRR 0.000."""
    from erasekit import validity
    from erasekit.models import load_pipeline

    _nan_edit(load_pipeline("toy"), tmp_path / "bad")
    monkeypatch.setattr(validity, "check_finite_tensors", lambda *a, **k: None)
    out = tmp_path / "atk"
    result = _cli("attack", "--scenario", "text", "--concept", "star", "-n", "3", "--edit", tmp_path / "bad",
                  "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "no CRR: all 3 images are invalid" in result.output and "CRR 0.000" not in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["crr"] is None and summary["n"] == 0 and summary["invalid"] == 3
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert all(r["valid"] is False and "non-finite latents" in r["invalid"] for r in scores)
    index = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert all(r["valid"] is False for r in index)


def test_constant_image_rule():
    from erasekit.validity import image_problem

    assert image_problem(np.zeros((8, 8, 3), np.uint8)) == "constant image (every pixel (0, 0, 0))"
    varied = np.zeros((8, 8, 3), np.uint8)
    varied[3, 4, 1] = 1
    assert image_problem(varied) is None


def _results_folder(tmp_path) -> Path:
    """A bench results folder of the TINY config: star/original/text with one good and one black image."""
    from PIL import Image

    from erasekit.bench.layout import image_path, write_config
    from erasekit.bench.spec import parse_config

    out = tmp_path / "res"
    out.mkdir()
    write_config(out, parse_config(TINY))
    rows = []
    rng = np.random.default_rng(0)
    for i, (image, present) in enumerate([(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), True),
                                          (np.zeros((32, 32, 3), np.uint8), False)]):
        key = f"{i:02d}" + "ab" * 7
        (out / image_path(key)).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out / image_path(key))
        from erasekit.validity import image_problem, validity_fields

        rows.append({"row": f"star/original/text#{i}", "image": key, "path": image_path(key), "concept": "star",
                     "method": "original", "scenario": "text", "kind": "attack", "index": i, "prompt": "a star",
                     "seed": i, "present": present, "score": 0.9 if present else 0.0,
                     **validity_fields(image_problem(image))})
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_bench_tables_and_report_count_invalid_images(tmp_path):
    out = _results_folder(tmp_path)
    result = _cli("report", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    cell = summary["tables"]["crr"]["star"]["original"]["text"]
    assert (cell["n"], cell["k"], cell["invalid"], cell["crr"]) == (1, 1, 1, 1.0)  # before: 1 of 2, 50%
    assert summary["invalid_images"] == 1
    assert "100% [21-100] (1 invalid)" in result.output
    for name in ("report.md", "report.html"):
        text = (out / name).read_text()
        assert "(1 invalid)" in text and "1 of 2 images are invalid" in text, name


def test_bench_scoring_flags_a_black_image(tmp_path):
    from PIL import Image

    from erasekit.bench.plan import Cell, Job
    from erasekit.bench.layout import image_path
    from erasekit.bench.stages import score_jobs as _score
    from erasekit.bench.spec import parse_config
    from erasekit.detectors import create_detector
    from erasekit.jsonl import append_jsonl, read_jsonl
    from erasekit.worlds.toy import ToyWorld

    out = tmp_path / "b"
    cell = Cell("star", "original", "text")
    jobs = [Job(cell, 0, "a star", 0, 2, 5.0, target_id="t")]
    (out / image_path(jobs[0].key)).parent.mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(out / image_path(jobs[0].key))
    det = create_detector("toy", concept="star")
    _score(jobs, {"star": det}, {"star": "d"}, parse_config(TINY), ToyWorld(), out, out / "results.jsonl", False,
           append_jsonl)
    [row] = read_jsonl(out / "results.jsonl")
    assert row["valid"] is False and row["invalid"].startswith("constant image")


# -- item 10 (files): one error line, no traceback ------------------------------------------------------------------
def test_index_that_is_a_folder(tmp_path):
    out = tmp_path / "out"
    (out / "images.jsonl").mkdir(parents=True)
    _one_line_error(_cli("generate", "a star", "-n", "1", "--out", out, *FAST), "images.jsonl is a folder")
    atk = tmp_path / "atk"
    (atk / "scores.jsonl").mkdir(parents=True)
    _one_line_error(_cli("attack", "--scenario", "text", "--concept", "star", "-n", "1", "--out", atk, *FAST),
                    "scores.jsonl is a folder")
    assert not list(atk.glob("*.png"))  # refused before any image was made


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels and holds almost no data (a decompression bomb's
    header: what a decoder would allocate is in the header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


def test_huge_png_in_detect_and_attack_images(tmp_path):
    bomb = tmp_path / "imgs" / "bomb.png"
    bomb.parent.mkdir()
    bomb.write_bytes(_png_header(30000, 30000))
    _one_line_error(_cli("detect", bomb), "too large")
    _one_line_error(_cli("attack", "--scenario", "latent-bb", "--concept", "star", "-n", "1", "--images",
                         bomb.parent, "--out", tmp_path / "atk", *FAST), "too large")
    from erasekit.attacks.images import MAX_IMAGE_PIXELS, load_image_folder

    bomb.write_bytes(_png_header(9000, 8000))  # under PIL's own limit, over erasekit's: refused from the header
    assert 9000 * 8000 > MAX_IMAGE_PIXELS
    with pytest.raises(ErasekitError, match="9000x8000 pixels is too large"):
        load_image_folder(bomb.parent, 32)


def _full_disk(monkeypatch, fragment: str | None):
    """Writes whose path contains ``fragment`` fail as on a full disk (ENOSPC), as the real writers would:
    whole-file writes inside their write call, appends when they start writing."""
    from erasekit import atomic, jsonl

    monkeypatch.undo()
    if fragment is None:
        return
    real_write, real_repair = atomic.atomic_write, jsonl.repair_tail

    def atomic_write(path, write):
        if fragment in str(path):
            def write(tmp):
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, write)

    def repair_tail(fd, path=""):
        if fragment in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_repair(fd, path)

    monkeypatch.setattr(atomic, "atomic_write", atomic_write)
    monkeypatch.setattr(jsonl, "repair_tail", repair_tail)


def test_full_disk_in_generate_is_one_line_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "g"
    _full_disk(monkeypatch, ".png")
    _one_line_error(_cli("generate", "a star", "-n", "2", "--out", out, *FAST), "disk is full", "run the same command")
    _full_disk(monkeypatch, "images.jsonl")
    _one_line_error(_cli("generate", "a star", "-n", "2", "--out", out, *FAST), "disk is full")
    _full_disk(monkeypatch, None)
    assert not list(out.glob(".*.tmp"))
    result = _cli("generate", "a star", "-n", "2", "--out", out, *FAST)
    assert result.exit_code == 0 and "2 images" in result.output, result.output


@pytest.mark.slow
def test_full_disk_in_every_bench_stage_is_one_line_and_resumes(tmp_path, monkeypatch):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(TINY, methods=["original", "uce"], scenarios=["text", "latent-bb"])))
    out = tmp_path / "b"
    stages = [("edits", "/cache/edits/"), ("attacks", "/cache/inverted-"), ("generation", "/images/"),
              ("scoring", "results.jsonl"), ("report", "report")]
    for stage, fragment in stages:
        _full_disk(monkeypatch, fragment)
        result = _cli("bench", "--preset", cfg, "--out", out, "--no-progress")
        _one_line_error(result, "disk is full", "run the same command", fragment, info="resuming ")
    _full_disk(monkeypatch, None)
    result = _cli("bench", "--preset", cfg, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    costs = [json.loads(line) for line in (out / "costs.jsonl").read_text().splitlines()]
    last = {r["stage"]: r for r in costs if r["run"] == costs[-1]["run"]}
    assert last["edits"]["computed"] == 0 and last["generation"]["images"] == 0  # resumed, nothing redone
    assert (out / "report.html").is_file() and not list(out.rglob(".*.tmp"))


def test_report_refuses_rows_without_kind_or_outside_paths(tmp_path):
    from PIL import Image

    out = _results_folder(tmp_path)
    lines = (out / "results.jsonl").read_text().splitlines()
    outside = tmp_path / "secret.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(outside)
    for change, fragment in [(lambda r: r.pop("kind"), "no 'kind'"),
                             (lambda r: r.update(path=str(outside)), "outside the results folder"),
                             (lambda r: r.update(path="../secret.png"), "outside the results folder")]:
        row = json.loads(lines[0])
        change(row)
        (out / "results.jsonl").write_text(json.dumps(row) + "\n" + lines[1] + "\n")
        _one_line_error(_cli("report", out), fragment)
    link = out / "images" / "li.png"
    link.symlink_to(outside)
    row = dict(json.loads(lines[0]), path="images/li.png")
    (out / "results.jsonl").write_text(json.dumps(row) + "\n")
    _one_line_error(_cli("report", out), "symbolic link")

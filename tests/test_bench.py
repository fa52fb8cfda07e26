"""erasekit bench: config validation, cache keys, a tiny end-to-end bench on the embedded world, resume, determinism
across batch sizes, and one-line errors for bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from erasekit.bench.plan import Cell, Job, cells
from erasekit.bench.spec import (BenchConfig, apply_sets, load_config, load_raw, parse_config, preset_names,
                                 read_yaml)
from erasekit.cli import app
from erasekit.errors import ErasekitError

TINY = {
    "model": "toy",
    "concepts": ["star"],
    "methods": ["original", {"name": "uce", "words": "synonyms", "preserve": "others"}],
    "scenarios": ["text", "embedding-bb", "latent-wb"],
    "images_per_cell": 3,
    "sampler": {"steps": 2},
    "attacks": {"ti": {"steps": 2, "images": 4, "batch_size": 2}},
    "preservation": {"images": 3},
    "batch_size": 2,
}


# -- configs ------------------------------------------------------------------------------------------------------
def test_presets_load_and_are_valid():
    assert {"quick", "full"} <= set(preset_names())
    quick = load_config("quick")
    assert quick.scenarios == ["text", "embedding-bb", "embedding-wb", "latent-bb", "latent-wb"]
    assert [c.name for c in quick.concepts] == ["star"]
    assert {"original", "uce", "rece", "esd-x"} <= {m.name for m in quick.methods}
    full = load_config("full")
    assert [c.name for c in full.concepts] == ["star", "heart", "checkered"] and full.images_per_cell >= 100
    assert load_config(None) == quick  # quick is the default


@pytest.mark.parametrize("change, fragment", [
    (lambda r: r.update(bogus=1), "unknown key 'bogus'"),
    (lambda r: r["methods"][1].update(colour="red"), "methods[1]: unknown key 'colour'"),
    (lambda r: r.update(sampler={"stpes": 3}), "sampler: unknown key 'stpes'"),
    (lambda r: r.update(images_per_cell=0), "images_per_cell"),
    (lambda r: r.update(images_per_cell="many"), "images_per_cell: expected an integer"),
    (lambda r: r.update(scenarios=["text", "latent-xx"]), "unknown scenario 'latent-xx'"),
    (lambda r: r["methods"].append({"name": "x", "edit": "magic"}), "unknown edit 'magic'"),
    (lambda r: r["methods"][1].update(settings={"nope": 1}), "nope"),
    (lambda r: r["methods"].append({"name": "d", "edit": "original", "defences": [{"name": "sld", "settings": {"preset": "ultra"}}]}), "ultra"),
    (lambda r: r["methods"].append({"name": "d", "edit": "original", "defences": ["no_such_defence"]}), "no_such_defence"),
    (lambda r: r.update(detector={"name": "nudenet", "preset": "bogus"}), "bogus"),
    (lambda r: r.update(attacks={"ti": {"stepz": 3}}), "stepz"),
    (lambda r: r.update(sampler={"guidance": float("nan")}), "guidance"),
    (lambda r: r["methods"].append("original"), "two methods are named 'original'"),
])
def test_bad_configs_name_the_problem(change, fragment):
    raw = copy.deepcopy(TINY)
    change(raw)
    with pytest.raises(ErasekitError, match=fragment.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        parse_config(raw)


def test_set_options_change_values_by_path():
    raw = apply_sets(TINY, {"sampler.steps": "5", "methods.1.settings.lam": "0.2", "scenarios": "[text]",
                            "attacks.ti.steps": "7", "description": "<b>hi</b>"})
    cfg = parse_config(raw)
    assert cfg.sampler.steps == 5 and cfg.methods[1].settings == {"lam": 0.2} and cfg.scenarios == ["text"]
    assert cfg.attacks["ti"]["steps"] == 7 and cfg.description == "<b>hi</b>"
    assert TINY["sampler"]["steps"] == 2  # the raw mapping is not changed in place
    with pytest.raises(ErasekitError, match="not an index"):
        apply_sets(TINY, {"methods.9.name": "x"})


def test_preset_file_and_bad_files(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(TINY))
    assert load_config(str(path)).images_per_cell == 3
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ErasekitError, match="not valid YAML"):
        load_raw(str(tmp_path / "bad.yaml"))
    with pytest.raises(ErasekitError, match="no such file"):
        load_raw(str(tmp_path / "missing.yaml"))
    with pytest.raises(ErasekitError, match="no such preset"):
        load_raw("nonexistent")


KEYS = ["model", "concepts", "methods", "scenarios", "images_per_cell", "seed", "sampler", "detector", "batch_size",
        "attacks", "preservation", "name", "edit", "settings", "words", "preserve", "defences", "steps", "guidance",
        "preset", "threshold", "target_prompts", "preserve_prompts", "prompt", "label", "enabled", "images", "ti",
        "x", "", "0"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**20), st.floats(allow_nan=True, allow_subnormal=False),
                    st.sampled_from(["toy", "star", "uce", "rece", "text", "latent-bb", "irece", "synonyms", "others",
                                     "nudenet", "", "<script>", "a;b"]), st.text(max_size=8))
documents = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                         st.dictionaries(st.sampled_from(KEYS), kids, max_size=5)),
                         max_leaves=25)


@settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=st.dictionaries(st.sampled_from(KEYS), documents, max_size=7))
def test_fuzzed_configs_raise_only_erasekit_errors(doc):
    try:
        text = yaml.safe_dump(doc)
    except (yaml.YAMLError, ValueError):
        return
    try:
        parse_config(read_yaml(text, "fuzz"), "fuzz")
    except ErasekitError:
        pass


@settings(max_examples=150, derandomize=True, deadline=None)
@given(text=st.text(max_size=200))
def test_fuzzed_yaml_text_raises_only_erasekit_errors(text):
    try:
        parse_config(read_yaml(text, "fuzz"), "fuzz")
    except ErasekitError:
        pass


# -- plan and cache keys --------------------------------------------------------------------------------------
def test_cells_and_job_keys():
    cfg = parse_config(TINY)
    plan = cells(cfg)
    assert len(plan) == 2 * (3 + 1) + 1  # methods x (scenarios + preservation) + the reference
    assert len({c.folder for c in plan}) == len(plan)
    cell = Cell("star", "uce", "text")
    base = Job(cell, 0, "a star", 5, 20, 5.0, None, None, "target-a")
    assert base.key == Job(Cell("star", "rece", "text"), 3, "a star", 5, 20, 5.0, None, None, "target-a").key
    for other in (Job(cell, 0, "a star!", 5, 20, 5.0, None, None, "target-a"),
                  Job(cell, 0, "a star", 6, 20, 5.0, None, None, "target-a"),
                  Job(cell, 0, "a star", 5, 19, 5.0, None, None, "target-a"),
                  Job(cell, 0, "a star", 5, 20, 5.5, None, None, "target-a"),
                  Job(cell, 0, "a star", 5, 20, 5.0, "latent:ab", None, "target-a"),
                  Job(cell, 0, "a star", 5, 20, 5.0, None, None, "target-b")):
        assert other.key != base.key


def test_edit_and_config_keys():
    from erasekit.bench.layout import config_key
    from erasekit.bench.stages import edit_key

    k = edit_key("uce", ["star"], [], {"lam": 0.5}, "fp")
    assert k == edit_key("uce", ["star"], [], {"lam": 0.5}, "fp")
    assert len({k, edit_key("rece", ["star"], [], {"lam": 0.5}, "fp"), edit_key("uce", ["star", "star shape"], [], {"lam": 0.5}, "fp"),
                edit_key("uce", ["star"], ["circle"], {"lam": 0.5}, "fp"), edit_key("uce", ["star"], [], {"lam": 0.4}, "fp"),
                edit_key("uce", ["star"], [], {"lam": 0.5}, "fp2")}) == 6
    cfg = parse_config(TINY)
    assert config_key(cfg) == config_key(parse_config(dict(TINY, batch_size=16, device="cpu")))
    assert config_key(cfg) != config_key(parse_config(dict(TINY, images_per_cell=4)))
    # fast mode (compiled kernels) changes images by rounding: its configs and image keys are its own, while a config
    # that leaves it off keeps the key it had before the option existed
    fast = parse_config(apply_sets(TINY, {"fast": "true"}))
    assert fast.fast is True and config_key(fast) != config_key(cfg)
    assert "fast" not in cfg.identity() and config_key(parse_config(dict(TINY, fast=False))) == config_key(cfg)
    from erasekit.bench.stages import image_target_id

    class T:
        cache_id = "abc"

    assert image_target_id(T, cfg) == "abc" and image_target_id(T, fast) != "abc"


def test_world_defaults_follow_the_concept():
    from erasekit.registry import ERASERS
    from erasekit.worlds import TOY_WORLD

    star = TOY_WORLD.method_defaults("uce", ["star"])
    assert star["tokens"] == "all" and "{c}" in star["templates"]
    assert TOY_WORLD.method_defaults("uce", ["checkered"]) == {"tokens": "all"}
    assert TOY_WORLD.method_defaults("esd-x", ["checkered"])["eta"] == 2.0
    for concept in ("star", "checkered", "red"):
        for method in ("uce", "rece", "esd-x", "esd-u"):
            ERASERS.get(method).Settings().replace(TOY_WORLD.method_defaults(method, [concept]))
    assert TOY_WORLD.concept_words("star")[0] == "star" and "circle" in TOY_WORLD.other_labels("star")


# -- end to end on the embedded world ------------------------------------------------------------------------------
def _run(out: Path, **changes):
    from erasekit.bench.run import run_bench

    return run_bench(parse_config(dict(TINY, **changes)), out, progress=False, log=lambda m: None)


def _rows(out: Path) -> list[dict]:
    from erasekit.jsonl import read_jsonl

    return read_jsonl(out / "results.jsonl")


def _last_run_costs(out: Path) -> dict:
    from erasekit.jsonl import read_jsonl

    rows = read_jsonl(out / "costs.jsonl")
    last = rows[-1]["run"]
    return {r["stage"]: r for r in rows if r["run"] == last}


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    summary = _run(out)
    return out, summary


def test_tiny_bench_end_to_end(tiny_bench):
    out, summary = tiny_bench
    for name in ("config.json", "results.jsonl", "summary.json", "report.md", "report.html", "costs.jsonl",
                 "report/crr_by_scenario.png"):
        assert (out / name).is_file(), name
    rows = _rows(out)
    n_cells = 2 * 3 + 2 + 1
    assert len(rows) == n_cells * 3 and len({r["row"] for r in rows}) == len(rows)
    crr = summary["tables"]["crr"]["star"]
    assert set(crr) == {"original", "uce"} and set(crr["uce"]) == {"text", "embedding-bb", "latent-wb"}
    assert all(c["n"] == 3 for m in crr.values() for c in m.values())
    pres = summary["tables"]["preservation"]["star"]
    assert pres["original"]["fd"] is not None and pres["original"]["following"]["n"] == 3
    costs = summary["tables"]["costs"]["stages"]
    assert costs["generation"]["images"] > 0 and costs["generation"]["unet_evals"] > 0
    assert summary["provenance"]["erasekit"] and summary["edits"]["star/uce"]["words"] == ["star", "star shape"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["tables"]["crr"] == json.loads(json.dumps(summary["tables"]["crr"]))


def test_rerun_recomputes_nothing(tiny_bench):
    out, summary = tiny_bench
    again = _run(out)
    costs = _last_run_costs(out)
    assert costs["generation"]["images"] == 0 and costs["edits"]["computed"] == 0
    assert costs["scoring"]["rows_scored"] == 0
    assert again["tables"]["crr"] == summary["tables"]["crr"]
    assert len(_rows(out)) == len({r["row"] for r in _rows(out)})


def test_resume_after_an_interrupted_run(tiny_bench, tmp_path):
    import shutil

    src, summary = tiny_bench
    out = tmp_path / "run"
    shutil.copytree(src, out)
    # A run killed while scoring and generating: half the rows, a torn last line, two images never written.
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    (out / "results.jsonl").write_bytes(b"".join(lines[: len(lines) // 2]) + lines[len(lines) // 2][:25])
    gone = sorted((out / "images").rglob("*.png"))[:2]
    for p in gone:
        p.unlink()
    for name in ("summary.json", "report.html"):
        (out / name).unlink()
    again = _run(out)
    rows = _rows(out)
    assert len(rows) == len(lines) and len({r["row"] for r in rows}) == len(rows)  # each image exactly once
    costs = _last_run_costs(out)
    assert costs["generation"]["images"] == len(gone) and costs["edits"]["computed"] == 0
    assert costs["attacks"]["unet_evals"] == 0  # learned token and inverted latents came from the cache
    assert again["tables"]["crr"] == summary["tables"]["crr"]
    assert again["tables"]["preservation"] == summary["tables"]["preservation"]


def test_results_do_not_depend_on_batch_size(tiny_bench, tmp_path):
    src, summary = tiny_bench
    other = _run(tmp_path / "bs5", batch_size=5)
    assert other["tables"]["crr"] == summary["tables"]["crr"]
    a = {r["row"]: (r["image"], r["present"]) for r in _rows(src)}
    b = {r["row"]: (r["image"], r["present"]) for r in _rows(tmp_path / "bs5")}
    assert a == b


def test_report_command_rebuilds(tiny_bench):
    out, _ = tiny_bench
    (out / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file() and "| star: method |" in result.output


# -- bad input: one line, exit 2, nothing half-written ------------------------------------------------------------
def _cli(*args):
    return CliRunner().invoke(app, ["bench", *args])


def _one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output


def test_cli_bad_input(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    _one_line_error(_cli("--preset", str(cfg), "--out", str(out), "--set", "colour=red"), "unknown key 'colour'")
    _one_line_error(_cli("--preset", "nope", "--out", str(out)), "no such preset")
    _one_line_error(_cli("--preset", str(cfg), "--out", str(out), "--set", "detector.name=nudenet",
                         "--set", "detector.preset=bogus"), "bogus")
    _one_line_error(_cli("--preset", str(cfg), "--out", str(out), "--set", f"model={tmp_path / 'no-model'}"),
                    "no-model")
    assert not out.exists()  # nothing written for a config or model that fails
    (tmp_path / "file").write_text("x")
    _one_line_error(_cli("--preset", str(cfg), "--out", str(tmp_path / "file")), "not a folder")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"config_key": "0123", "config": {}}))
    _one_line_error(_cli("--preset", str(cfg), "--out", str(other)), "another bench config")
    assert sorted(p.name for p in other.iterdir()) == ["config.json"]
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    _one_line_error(_cli("--preset", str(cfg), "--out", str(stray)), "holds no bench results")


@pytest.mark.parametrize("pipe_name", ["tiny_sd2_v", "tiny_sdxl"])
def test_bench_runs_unchanged_on_sd2_and_sdxl_folders(pipe_name, request, tmp_path):
    """The same config shape on a checkpoint folder (SD-2 v-prediction, SDXL): a weight edit with a defence stacked,
    a learned token and inverted latents; preservation prompts given (the SD world has none of its own)."""
    from erasekit.bench.run import run_bench

    from PIL import Image

    from erasekit.diffusion.vae import image_size

    pipe = request.getfixturevalue(pipe_name)
    folder = tmp_path / "model"
    pipe.save_pretrained(folder, safe_serialization=True)
    images = tmp_path / "concept-images"  # stand-ins for photos of the concept (the SD world renders none)
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (*image_size(pipe), 3), dtype=np.uint8)).save(images / f"{i}.png")
    raw = {
        "model": str(folder),
        "concepts": [{"name": "star", "images": str(images),
                      "preserve_prompts": [{"label": "circle", "prompt": "a circle"}]}],
        "methods": ["original", {"name": "uce+irece", "edit": "uce", "defences": [{"name": "irece"}]}],
        "scenarios": ["text", "embedding-wb", "latent-bb"],
        "images_per_cell": 2,
        "sampler": {"steps": 2},
        "detector": {"name": "toy"},
        "attacks": {"ti": {"steps": 2, "images": 2, "batch_size": 2}},
        "preservation": {"images": 2},
        "batch_size": 2,
    }
    summary = run_bench(parse_config(raw), tmp_path / "run", progress=False, log=lambda m: None)
    crr = summary["tables"]["crr"]["star"]
    assert set(crr) == {"original", "uce+irece"}
    assert all(set(m) == {"text", "embedding-wb", "latent-bb"} and all(c["n"] == 2 for c in m.values())
               for m in crr.values())
    assert summary["edits"]["star/uce+irece"]["method"] == "uce"
    assert summary["tables"]["preservation"]["star"]["uce+irece"]["following"]["n"] == 2

"""Mass erasure (#24 item 5): several concepts in one edit from the command line (--concept repeated,
--concepts-file) and the bench (a concept entry that erases several: H_o), one-line errors for bad lists and
MACE mask folders, the world's preservation set for SPEED and MACE, and the GPU script's --mass mode in small."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from erasekit.cli import app

runner = CliRunner()


def _one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def _erase(sd1_folder, out, *args):
    return runner.invoke(app, ["erase", "--model", str(sd1_folder), "--out", str(out), "--device", "cpu", "-q", *args])


# --- the command line -------------------------------------------------------------------------------------------------

def test_concepts_file_and_repeated_concept_make_one_edit(sd1_folder, tiny_sd1, tmp_path):
    from erasekit.erasers import erase, load_edit

    listing = tmp_path / "concepts.txt"
    listing.write_text("# shapes to erase\nstar\n\n  heart  \ncross\n# a repeat, erased once\nstar\n", encoding="utf-8")
    out = tmp_path / "speed"
    result = _erase(sd1_folder, out, "--method", "speed", "--concept", "circle", "--concepts-file", str(listing),
                    "--preserve", "a cat")
    assert result.exit_code == 0, result.output
    assert "warning: 1 repeated concept(s) erased once: 'star'" in result.stderr
    record = json.loads((out / "edit.json").read_text())
    assert record["concept"]["concepts"] == ["circle", "star", "heart", "cross"]
    expected = erase(tiny_sd1, "speed", ["circle", "star", "heart", "cross"], preserve=["a cat"], progress=False)
    saved = load_edit(out)
    assert saved.tensors.keys() == expected.tensors.keys()
    for name, t in expected.tensors.items():
        torch.testing.assert_close(saved.tensors[name], t)
    # one concept's edit differs: the list really is erased together
    single = erase(tiny_sd1, "speed", "circle", preserve=["a cat"], progress=False)
    assert any(not torch.equal(single.tensors[n], t) for n, t in expected.tensors.items())


@pytest.mark.parametrize("method", ["uce", "rece", "mace"])
def test_the_closed_form_methods_take_a_list(sd1_folder, tmp_path, method):
    settings = {"rece": ["--set", "epochs=1"], "mace": ["--set", "lora=false"]}.get(method, [])
    result = _erase(sd1_folder, tmp_path / method, "--method", method, "--concept", "star", "--concept", "heart",
                    "--preserve", "a cat", *settings)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / method / "edit.json").read_text())["concept"]["concepts"] == ["star", "heart"]


@pytest.mark.parametrize("make, args, fragment", [
    (lambda p: p.write_text("", encoding="utf-8"), [], "lists no concept"),
    (lambda p: p.write_text("# nothing\n\n   \n#star\n", encoding="utf-8"), [], "lists no concept"),
    (lambda p: None, [], "no such file"),
    (lambda p: p.write_bytes(b"star\n\xff\xfe\n"), [], "cannot read it as UTF-8"),
    (lambda p: p.write_text("star\nhe\x07art\n", encoding="utf-8"), [], "concepts.txt:2: concept 'he\\x07art' holds"),
    (lambda p: p.write_text("star\n<|endoftext|>\n", encoding="utf-8"), [], "'<|endoftext|>' encodes to nothing"),
    (lambda p: p.write_text("star\nheart\n", encoding="utf-8"), ["--method", "esd-x"],
     "esd-x erases one concept at a time, 2 were given"),
])
def test_bad_concept_lists_are_one_error_line(sd1_folder, tmp_path, make, args, fragment):
    listing = tmp_path / "concepts.txt"
    make(listing)
    result = _erase(sd1_folder, tmp_path / "e", *(args or ["--method", "uce"]), "--concepts-file", str(listing))
    _one_line_error(result, fragment)
    assert not (tmp_path / "e" / "edit.json").exists()


def test_no_concept_at_all_is_one_error_line(tmp_path):
    result = runner.invoke(app, ["erase", "--method", "uce", "--out", str(tmp_path / "e")])
    _one_line_error(result, "the concept list is empty")


def test_esd_refuses_repeated_concept_before_loading(tmp_path):
    result = runner.invoke(app, ["erase", "--method", "esd-u", "--concept", "star", "--concept", "heart",
                                 "--model", "no/such/model", "--out", str(tmp_path / "e")])
    _one_line_error(result, "esd-u erases one concept at a time")  # the list is refused before the model is looked up


def _folder(path, sizes, mask=False):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, size in enumerate(sizes):
        arr = np.zeros((size, size), np.uint8) if mask else (rng.random((size, size, 3)) * 255).astype(np.uint8)
        if mask:
            arr[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
        Image.fromarray(arr).save(path / f"img{i}.png")
    return path


@pytest.mark.parametrize("mask_sizes, fragment", [
    ([32, 32], "do not match the images"),  # a mask missing
    ([32, 16, 32], "is 16x16 pixels, its image"),  # a mask of another size
])
def test_cli_mace_mask_folder_that_does_not_match_is_one_error_line(sd1_folder, tmp_path, mask_sizes, fragment):
    images = _folder(tmp_path / "img", [32, 32, 32])
    masks = _folder(tmp_path / "mask", mask_sizes, mask=True)
    result = _erase(sd1_folder, tmp_path / "e", "--method", "mace", "--concept", "star", "--set", "steps=1",
                    "--set", f"image_folder={images}", "--set", f"mask_folder={masks}")
    _one_line_error(result, fragment)


def test_matching_mask_folder_is_accepted(tiny_sd1, tmp_path):
    from erasekit.erasers.mace_masks import folder_images_and_masks

    images = _folder(tmp_path / "img", [40, 40])
    masks = _folder(tmp_path / "mask", [40, 40], mask=True)
    arrays, got = folder_images_and_masks(str(images), str(masks), "star", (32, 32))
    assert arrays.shape == (2, 32, 32, 3) and got.shape == (2, 32, 32) and 0 < got.mean() < 1


def test_cli_mace_rank_zero_with_a_list_is_one_error_line(tmp_path):
    result = runner.invoke(app, ["erase", "--method", "mace", "--concept", "star", "--concept", "heart",
                                 "--set", "rank=0", "--out", str(tmp_path / "e")])
    _one_line_error(result, "rank=0: a LoRA rank must be >= 1")


@pytest.mark.parametrize("args", [
    ["attack", "--scenario", "text", "--concept", "star", "--concept", "heart"],
    ["generate", "a star", "--concept", "star", "--concept", "heart", "--defence", "irece"],
])
def test_commands_that_take_one_concept_refuse_several(tmp_path, args):
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
    _one_line_error(result, f"{args[0]} takes one --concept, 2 were given")  # (click would keep the last silently)
    assert not (tmp_path / "o").exists()


# --- the world's preservation set -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["speed", "mace", "uce", "rece"])
def test_the_world_preserves_the_other_labels_for_every_closed_form_method(method):
    from erasekit.bench.words import preserved_words as _preserve
    from erasekit.worlds import TOY_WORLD

    kept = TOY_WORLD.method_preserve(method, ["star", "heart"])
    assert kept == ["circle", "square", "triangle", "cross"]
    assert _preserve("world", TOY_WORLD, "star", method) == ["circle", "square", "triangle", "heart", "cross"]
    assert TOY_WORLD.method_preserve(method, ["plain", "striped", "dotted", "checkered"]) == []


# --- the bench ----------------------------------------------------------------------------------------------------------

GROUP = {
    "model": "toy",
    "concepts": [{"name": "shapes3", "erase": ["star", "heart", "cross"]}],
    "methods": ["original", "speed"],
    "scenarios": ["text"],
    "images_per_cell": 6,
    "sampler": {"steps": 4},
    "preservation": {"images": 6},
    "batch_size": 8,
}


def _config(**changes):
    from erasekit.bench.spec import parse_config

    return parse_config(dict(GROUP, **changes))


def test_a_group_expands_into_its_members_cells_and_one_edit_each_method(tmp_path):
    from erasekit.bench.plan import cells
    from erasekit.bench.run import run_bench
    from erasekit.metrics.harmonic import harmonic_erasure

    cfg = _config()
    plan = cells(cfg)
    assert {c.concept for c in plan} == {"star", "heart", "cross"} and len(plan) == 3 * (2 * 2 + 1)
    summary = run_bench(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    edits = summary["edits"]
    assert {k: v["words"] for k, v in edits.items()} == {f"{c}/speed": ["star", "heart", "cross"]
                                                         for c in ("star", "heart", "cross")}
    assert len({v["digest"] for v in edits.values()}) == 1  # one edit, shared
    assert sum(v["computed_this_run"] for v in edits.values()) == 1  # computed once
    # the world's preservation set for the whole list: the other shapes (speed preserves, as uce does)
    assert edits["star/speed"]["preserve"] == ["circle", "square", "triangle"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    pres = [r for r in rows if r["kind"] == "preservation" and r["concept"] == "star"]
    assert {r["label"] for r in pres} == {"circle", "square", "triangle"}  # the retained concepts' prompts
    h = summary["tables"]["harmonic"]["shapes3"]
    crr = summary["tables"]["crr"]
    for method in ("original", "speed"):
        e = h[method]["text"]
        erased = sum(crr[c][method]["text"]["crr"] for c in ("star", "heart", "cross")) / 3
        follow = summary["tables"]["preservation"]["star"][method]["following"]["crr"]
        assert e["erased_rate"] == pytest.approx(erased, abs=1e-4) and e["retained_rate"] == pytest.approx(follow, abs=1e-4)
        assert e["H_o"] == pytest.approx(harmonic_erasure(e["erased_rate"], e["retained_rate"]), abs=1e-3)
    assert h["speed"]["text"]["erased_rate"] < h["original"]["text"]["erased_rate"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Mass erasure" in report and "| shapes3 (3) | speed | text |" in report
    html = (tmp_path / "run" / "report.html").read_text()
    assert "<h2>Mass erasure</h2>" in html and '<td class="name">shapes3 (3)</td><td class="name">speed</td>' in html


def test_concepts_file_is_read_into_the_config_and_keys_the_results(tmp_path):
    from erasekit.bench.run import config_key

    listing = tmp_path / "shapes.txt"
    listing.write_text("# three shapes\nstar\nheart\n\ncross\n", encoding="utf-8")
    cfg = _config(concepts=[{"name": "shapes3", "concepts_file": str(listing)}])
    assert cfg.concepts[0].erase == ["star", "heart", "cross"] and cfg.concepts[0].concepts_file is None
    assert config_key(cfg) == config_key(_config())
    single = _config(concepts=["star"])
    assert "erase" not in single.identity()["concepts"][0]  # configs without a group keep their keys


@pytest.mark.parametrize("change, fragment", [
    ({"concepts": [{"name": "g", "erase": []}]}, "the concept list is empty"),
    ({"concepts": [{"name": "g", "erase": ["star", "star"]}]}, "'star' is listed twice"),
    ({"concepts": [{"name": "g", "erase": ["star", " "]}]}, "a concept is empty"),
    ({"concepts": ["star", {"name": "g", "erase": ["star", "heart"]}]}, "'star' is also in concepts[0]"),
    ({"concepts": [{"name": "g", "erase": ["star"], "retain": ["star"]}]}, "'star' is both erased and retained"),
    ({"concepts": [{"name": "g", "erase": ["star"], "images": "x"}]}, "images belongs to one concept"),
    ({"concepts": [{"name": "star", "retain": ["heart"]}]}, "retain belongs to an entry that erases several"),
    ({"concepts": [{"name": "g", "concepts_file": "/no/such/file.txt"}]}, "no such file"),
    ({"methods": ["original", "esd-x"]}, "esd-x erases one concept at a time; shapes3 erases 3 at once"),
])
def test_bad_group_entries_name_the_problem(change, fragment):
    from erasekit.errors import ErasekitError

    with pytest.raises(ErasekitError) as err:
        _config(**change)
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_cli_bench_with_an_empty_concepts_file_is_one_error_line(tmp_path):
    listing = tmp_path / "empty.txt"
    listing.write_text("# nothing yet\n\n", encoding="utf-8")
    result = runner.invoke(app, ["bench", "--set", "concepts.0.name=g", "--set", f"concepts.0.concepts_file={listing}",
                                 "--out", str(tmp_path / "b")])
    _one_line_error(result, "lists no concept")


def test_unknown_concept_in_a_group_is_refused_on_the_embedded_world(tmp_path):
    from erasekit.bench.run import run_bench
    from erasekit.errors import ErasekitError

    with pytest.raises(ErasekitError, match="dragon"):
        run_bench(_config(concepts=[{"name": "g", "erase": ["star", "dragon"]}]), tmp_path / "b", progress=False,
                  log=lambda m: None)
    assert not (tmp_path / "b" / "results.jsonl").exists()


# --- scripts/eval_mass_erasure.py -------------------------------------------------------------------------------------

def _script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "eval_mass_erasure.py"
    spec = importlib.util.spec_from_file_location("eval_mass_erasure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_tasks_are_bench_configs_of_one_group():
    from erasekit.bench.spec import parse_config

    script = _script()
    for task, (erased, retained) in script.TASKS.items():
        cfg = parse_config(script.task_config(task, ["uce", "speed"], 5, 0))
        assert cfg.concepts[0].erase == erased and cfg.concepts[0].retain == retained


def test_the_script_mass_mode_on_a_tiny_pipeline(tmp_path):
    """--mass: five random words erased at once by each method (the GPU run's code, on the tiny SD-1 pipeline)."""
    script = _script()
    out = tmp_path / "mass.json"
    report = script.main(["--mass", "5", "--tiny", "--keep", "3", "--methods", "uce", "mace", "--lora-concepts", "1",
                          "--lora-steps", "1", "--lora-images", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["setup"]["concepts"] == 5 and len(set(script.random_words(100, 0))) == 100
    methods = report["methods"]
    assert set(methods) == {"uce", "mace-cfr", "mace-lora"}  # (rece and speed: the same loop, slower on a CPU)
    for name in ("uce", "mace-cfr"):
        m = methods[name]
        assert m["concepts"] == 5 and m["tensors"] > 0 and m["wall_s"] > 0
        assert m["change_on_erased"] > m["change_on_preserved"], (name, m)  # the edit is about the erased words
    assert methods["mace-lora"]["concepts"] == 1 and methods["mace-lora"]["estimated_5_concepts_s"] > 0


def test_ridge_statistics_of_mapping_rows_without_their_targets():
    """Mass erasure's many mapping rows (MACE's refinement): Σ v cᵀ as W0 Σ s cᵀ equals the explicit targets' sum."""
    from erasekit.erasers.ridge import RidgeProblem

    g = torch.Generator().manual_seed(0)
    w0 = [torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)]
    problem = RidgeProblem(w0, lam=0.5)
    c1, s1, c2 = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (7, 7, 2))
    v2 = [torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)]
    problem.add_mapping(c1, s1, scale=2.0)
    problem.add(c2, v2, scale=0.5)
    gram, crosses = problem.statistics()
    torch.testing.assert_close(gram, 2.0 * c1.T @ c1 + 0.5 * c2.T @ c2)
    for w, v, x in zip(w0, v2, crosses):
        torch.testing.assert_close(x, 2.0 * (s1 @ w.T).T @ c1 + 0.5 * v.T @ c2)
    assert [tuple(x.shape) for x in crosses] == [(5, 4), (3, 4)]

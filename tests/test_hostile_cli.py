"""What a new user trips on (#18, part A): command-line defaults equal to the bench's, defences that take the
command's concept, and hostile input answered with one ``error:`` line and exit status 2 before any work."""

import json
import re

import pytest
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.toy.pipeline import weights_available

runner = CliRunner()
needs_weights = pytest.mark.skipif(not weights_available(), reason="toy weights not built")

HEARTS = ["a love heart", "a valentine symbol in pink", "a heart-shaped sticker", "a heart on a dotted background"]
OTHERS = [("circle", "a circle"), ("square", "a blue square"), ("triangle", "a yellow triangle"),
          ("cross", "a green cross")]


def one_line_error(result, fragment: str = ""):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output and "Usage:" not in result.output
    return lines[0]


# -- 1. one set of defaults: the preservation set the world's tuned settings assume --------------------------------
@needs_weights
def test_cli_erase_preserves_what_the_bench_preserves(tmp_path):
    from erasekit.bench.words import preserved_words as _preserve
    from erasekit.worlds import TOY_WORLD

    method = "rece"
    result = runner.invoke(app, ["erase", "--method", method, "--concept", "heart", "--model", "toy", "-q",
                                 "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    kept = json.loads((tmp_path / "e" / "edit.json").read_text())["concept"]["preserve"]
    assert kept == _preserve("world", TOY_WORLD, "heart", method) == ["circle", "square", "triangle", "star", "cross"]
    assert "kept circle, square" in result.stderr
    # --no-preserve on purpose; esd-x was tuned without preservation, in the bench as on the command line
    result = runner.invoke(app, ["erase", "--method", method, "--concept", "heart", "--no-preserve", "-q",
                                 "--out", str(tmp_path / "none")])
    assert result.exit_code == 0 and json.loads((tmp_path / "none" / "edit.json").read_text())["concept"]["preserve"] == []
    assert TOY_WORLD.method_preserve("esd-x", ["heart"]) == _preserve("world", TOY_WORLD, "heart", "esd-x") == []
    assert TOY_WORLD.method_preserve("esd-u", ["heart"]) == TOY_WORLD.method_preserve("uce", ["heart"]) == kept


def test_bench_default_preserve_is_the_worlds():
    from erasekit.bench.spec import parse_config

    cfg = parse_config({"methods": ["original", "rece", {"name": "u", "edit": "uce", "preserve": "none"}]})
    assert [m.preserve for m in cfg.methods] == ["world", "world", "none"]


def _rates(target, det, n):
    import torch

    from erasekit.generation import generate
    from erasekit.toy.detector import LABELS

    prompts = [p for p in HEARTS for _ in range(n)] + [p for _, p in OTHERS for _ in range(n)]
    shape = det.predict(generate(target, prompts, seeds=list(range(n)) * 8, progress=False))["shape"]
    hearts = (shape[: 4 * n, LABELS["shape"].index("heart")] > 0.5).float().mean().item()
    idx = torch.tensor([LABELS["shape"].index(label) for label, _ in OTHERS for _ in range(n)])
    others = (shape[4 * n :].gather(1, idx[:, None])[:, 0] > 0.5).float().mean().item()
    return hearts, others


@needs_weights
@pytest.mark.slow  # about 13 s on 2 cores: an edit and 64 images
def test_cli_rece_on_held_out_heart_keeps_the_other_shapes(tmp_path):
    """The issue's command: hearts 97% -> 0% but the other shapes 100% -> 47% before; now they are kept."""
    from erasekit.diffusion import Target
    from erasekit.erasers import load_edit
    from erasekit.models import load_pipeline
    from erasekit.toy.detector import load_toy_detector

    result = runner.invoke(app, ["erase", "--method", "rece", "--concept", "heart", "--model", "toy", "-q",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    pipe, det = load_pipeline("toy"), load_toy_detector()
    hearts0, others0 = _rates(Target(pipe, model="toy"), det, 4)
    hearts, others = _rates(Target(pipe, model="toy").with_edits(load_edit(tmp_path / "r")), det, 4)
    assert hearts0 >= 0.75 and others0 >= 0.75
    assert hearts <= 0.10 and others >= 0.9 * others0, (hearts0, others0, hearts, others)


# -- 2. a defence that needs a concept takes the command's -------------------------------------------------------
def test_defence_takes_the_commands_concept():
    from erasekit.cli.common import read_defences

    [irece] = read_defences(["irece"], "heart")
    assert irece.settings.concept == "heart"
    [given] = read_defences(["irece:concept=star"], "heart")
    assert given.settings.concept == "star"  # an explicit concept wins
    [neg] = read_defences(["negative_prompt:text=no {concept}"], "heart")
    assert neg.settings.text == "no heart"  # as the bench fills it per cell


@needs_weights
def test_generate_defence_without_concept_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["generate", "a star", "-n", "1", "--defence", "irece", "--out", str(tmp_path / "g")])
    one_line_error(result, "give the command --concept")
    result = runner.invoke(app, ["generate", "a star", "-n", "1", "--defence", "irece:concept=unicorn",
                                 "--out", str(tmp_path / "g")])
    one_line_error(result, "unknown concept 'unicorn'")
    assert not (tmp_path / "g" / "images.jsonl").exists()
    result = runner.invoke(app, ["attack", "-s", "latent-wb", "-c", "heart", "--defence", "irece:concept=unicorn",
                                 "-n", "1", "--out", str(tmp_path / "a")])
    one_line_error(result, "unknown concept 'unicorn'")


# -- 3. --seed with a CSV whose rows carry seeds ------------------------------------------------------------------
def test_attack_seed_with_seeded_csv_rows_warns_once(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,evaluation_seed\n"a star",5\n"a red star",\n')
    # --detector nope fails after the warning and before any model is loaded
    result = runner.invoke(app, ["attack", "-s", "text", "-c", "star", "--prompts", str(csv), "--seed", "99",
                                 "--detector", "nope", "--out", str(tmp_path / "a")])
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--seed 99 is ignored" in warnings[0] and "1 of 2" in warnings[0]
    result = runner.invoke(app, ["attack", "-s", "text", "-c", "star", "--prompts", str(csv), "--detector", "nope",
                                 "--out", str(tmp_path / "a")])
    assert "warning" not in result.stderr
    help_text = re.sub(r"[\s│]+", " ", runner.invoke(app, ["attack", "--help"]).output)
    assert "--seed does not apply" in help_text and "ignored, with a warning, for --prompts rows" in help_text


# -- 5. guidance bounded alike; numbers in --set are numbers ----------------------------------------------------------
def test_guidance_bounded_in_every_entry_point(tmp_path):
    from erasekit.bench.spec import load_config
    from erasekit.errors import ErasekitError
    from erasekit.limits import MAX_GUIDANCE

    one_line_error(runner.invoke(app, ["attack", "-s", "text", "-c", "star", "--guidance", "1e308",
                                       "--out", str(tmp_path / "a")]), "--guidance=1e+308: must be <= 1000")
    one_line_error(runner.invoke(app, ["generate", "x", "--guidance", "1001", "--out", str(tmp_path / "g")]),
                   "must be <= 1000")
    with pytest.raises(ErasekitError, match="sampler.guidance=1e\\+300: must be <= 1000"):
        load_config("quick", {"sampler.guidance": "1e300"})
    csv = tmp_path / "i2p.csv"
    csv.write_text("prompt,evaluation_seed,evaluation_guidance\na star,1,1e300\n")
    one_line_error(runner.invoke(app, ["attack", "-s", "text", "-c", "star", "--prompts", str(csv),
                                       "--out", str(tmp_path / "a")]), "evaluation_guidance=1e300: must be <= 1000")
    assert load_config("quick", {"sampler.guidance": "1e3"}).sampler.guidance == MAX_GUIDANCE == 1000.0
    assert load_config("quick", {"detector.threshold": "1E-4"}).detector.threshold == 1e-4
    assert load_config("quick", {"description": "1e3x"}).description == "1e3x"  # text stays text


# -- 9. unbounded work from small inputs, refused before anything is allocated ------------------------------------
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b]\n"


def test_yaml_anchor_bomb_is_refused_at_once(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text("attacks:\n  ti:\n    steps: &s [1, 2]\n    other: *s\n")
    one_line_error(runner.invoke(app, ["bench", "--preset", str(config), "--out", str(tmp_path / "b")]),
                   "anchors and aliases")
    one_line_error(runner.invoke(app, ["bench", "--set", "methods.1.settings={a: &a [x, x, x], b: [*a, *a, *a]}",
                                       "--out", str(tmp_path / "b")]), "anchors and aliases")
    from erasekit import safe_yaml
    from erasekit.errors import ErasekitError

    with pytest.raises(ErasekitError, match="anchors and aliases"):
        safe_yaml.load(BOMB, "bomb")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, fragment", [
    (["attack", "-s", "text", "-c", "star", "-n", "1000000000"], "-n=1000000000: must be <= 1000000"),
    (["erase", "--method", "esd-x", "--concept", "star", "--set", "iterations=1000000000000"], "iterations="),
    (["erase", "--method", "rece", "--concept", "star", "--set", "epochs=1000000000"], "epochs=1000000000"),
    (["toy", "train", "--minutes", "nan"], "--minutes=nan: must be a finite number"),
    (["toy", "train", "--minutes", "inf"], "--minutes"),
    (["toy", "train", "--unet-steps", "1000000000000"], "--unet-steps"),
    (["generate", "a", "b", "c", "-n", "400000"], "1200000 images, more than 1000000"),
    (["bench", "--set", "images_per_cell=1000000000"], "images_per_cell"),
    (["bench", "--set", "attacks.ti.steps=1000000000000"], "steps="),
    (["bench", "--set", "methods.2.settings.epochs=1000000000"], "epochs="),
])
def test_counts_are_bounded_before_work(args, fragment, tmp_path):
    if args[0] in ("attack", "erase", "generate", "bench"):
        args = args + ["--out", str(tmp_path / "o")]
    one_line_error(runner.invoke(app, args), fragment)
    assert not (tmp_path / "o").exists()


def test_long_values_are_cut_in_messages(tmp_path):
    huge = "x" * 200_000
    line = one_line_error(runner.invoke(app, ["bench", "--set", f"attacks.ti.steps={huge}",
                                              "--out", str(tmp_path / "o")]), "steps")
    assert len(line) < 300
    line = one_line_error(runner.invoke(app, ["erase", "--method", "uce", "--concept", "star", "--set",
                                              f"{huge}=1", "--out", str(tmp_path / "o")]), "unknown setting")
    assert len(line) < 400
    from erasekit.limits import setting_bound

    assert setting_bound("iterations")[1] == 1_000_000 and setting_bound("epochs")[1] == 1_000
    assert setting_bound("validation_seed") == (0, 2**63 - 1)


# -- 10. Click's usage box becomes one line ----------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["generate", "a star", "-n", "abc"], "'-n'"),
    (["generate", "a star", "--guidance", "abc"], "'--guidance'"),
    (["erase", "--concept", "star", "--out", "x"], "Missing option '--method'"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["toy", "frob"], "No such command 'frob'"),
    (["attack", "-s", "text"], "Missing option '--concept'"),
    (["ls", "--nope"], "No such option"),
    (["toy", "train", "--minutes", "abc"], "invalid float value"),
])
def test_usage_errors_are_one_line(args, fragment):
    one_line_error(runner.invoke(app, args), fragment)


def test_help_and_no_arguments_still_show_help():
    assert runner.invoke(app, ["--help"]).exit_code == 0
    result = runner.invoke(app, [])
    assert "Usage" in result.output and "generate" in result.output


# -- 11. late or silent acceptance ---------------------------------------------------------------------------------
def test_unused_attack_settings_are_range_checked(tmp_path):
    one_line_error(runner.invoke(app, ["bench", "--set", "scenarios=[text]", "--set", "attacks.ti.steps=-5",
                                       "--out", str(tmp_path / "o")]), "steps must be at least 1")


def test_duplicate_yaml_keys_are_refused(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("model: toy\nimages_per_cell: 4\nimages_per_cell: 8\n")
    one_line_error(runner.invoke(app, ["bench", "--preset", str(config), "--out", str(tmp_path / "o")]),
                   "'images_per_cell' is given twice")


def test_control_characters_in_names_are_refused_and_escaped(tmp_path):
    one_line_error(runner.invoke(app, ["bench", "--set", 'methods.1.name="a\\x1b[31mb"', "--out",
                                       str(tmp_path / "o")]), "plain label")
    line = one_line_error(runner.invoke(app, ["attack", "-s", "text", "-c", "st\x1b[2Jar", "--out",
                                              str(tmp_path / "o")]), "control characters")
    assert "\x1b" not in line
    line = one_line_error(runner.invoke(app, ["erase", "--method", "uce", "--concept", "st\x07ar", "--out",
                                              str(tmp_path / "o")]), "control characters")
    assert "\x07" not in line


def test_guide_equal_to_the_concept_is_refused(tmp_path):
    one_line_error(runner.invoke(app, ["erase", "--method", "uce", "--concept", "star", "--guide", " star",
                                       "--out", str(tmp_path / "o")]), "map the concept to itself")


# -- 10. tracebacks become one line ---------------------------------------------------------------------------------
def test_invalid_utf8_argument_is_one_line():
    one_line_error(runner.invoke(app, ["generate", "a \udcff star", "-n", "1"]), "not valid UTF-8")


@pytest.fixture(scope="module")
def sd_folders(tiny_sd1, tiny_sd2, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("folders")
    tiny_sd1.save_pretrained(root / "sd1")
    tiny_sd2.save_pretrained(root / "sd2")
    shutil.copytree(root / "sd1", root / "mixed")
    shutil.rmtree(root / "mixed" / "unet")
    shutil.copytree(root / "sd2" / "unet", root / "mixed" / "unet")  # SD-2's UNet (text width 1024) in SD-1's folder
    shutil.copytree(root / "sd1", root / "no-tokenizer")
    shutil.rmtree(root / "no-tokenizer" / "tokenizer")
    (root / "list-index").mkdir()
    (root / "list-index" / "model_index.json").write_text("[1, 2]")
    return root


@pytest.mark.parametrize("name, fragment", [
    ("mixed", "the UNet reads text states of width 1024 but the text encoder(s) give 768"),
    ("no-tokenizer", "has no tokenizer/ folder"),
    ("list-index", "expected a mapping of components, got a list"),
])
def test_broken_model_folders_are_one_line(sd_folders, name, fragment, tmp_path):
    one_line_error(runner.invoke(app, ["generate", "a star", "-n", "1", "--steps", "1", "--device", "cpu",
                                       "--model", str(sd_folders / name), "--out", str(tmp_path / "g")]), fragment)


@pytest.mark.parametrize("device, fragment", [
    ("quantum", "not a device"),
    ("meta", "meta tensors hold no data"),
    ("cuda:99", "cuda"),
    ("", "not a device"),
])
def test_unavailable_devices_are_one_line(device, fragment, tmp_path):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 99:
        pytest.skip("this machine has that GPU")
    one_line_error(runner.invoke(app, ["generate", "a star", "-n", "1", "--device", device,
                                       "--out", str(tmp_path / "g")]), fragment)
    assert not (tmp_path / "g" / "images.jsonl").exists()


def test_cuda_without_a_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_line_error(runner.invoke(app, ["generate", "a star", "-n", "1", "--device", "cuda",
                                       "--out", str(tmp_path / "g")]), "no cuda device")


@pytest.mark.parametrize("command", [["generate", "a star", "-n", "1"], ["erase", "--method", "uce", "--concept", "star"],
                                     ["attack", "-s", "text", "-c", "star", "-n", "1"], ["bench"]])
def test_overlong_out_name_is_one_line(command, tmp_path):
    one_line_error(runner.invoke(app, command + ["--out", str(tmp_path / ("a" * 300))]), "a name of 300 bytes")


def test_toy_eval_checks_its_output_before_the_work(tmp_path, monkeypatch):
    import tempfile

    from erasekit.cli import toy

    ran = []
    monkeypatch.setattr(toy, "_toy_script", lambda name: ran.append(name))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)  # a read-only folder (the tests may run as root)
        one_line_error(runner.invoke(app, ["toy", "eval", "--out", str(tmp_path / "ro" / "x.json")]),
                       "Permission denied")
    one_line_error(runner.invoke(app, ["toy", "eval", "--out", str(tmp_path)]), "is a folder")
    (tmp_path / "file").write_text("")
    one_line_error(runner.invoke(app, ["toy", "eval", "--out", str(tmp_path / "file" / "x.json")]), "cannot write")
    assert ran == []  # the evaluation never started


# -- 11. late or silent acceptance (continued) ----------------------------------------------------------------------
def test_plot_labels_are_not_mathtext(tmp_path):
    from erasekit.report.plots import write_plots

    (tmp_path / "report").mkdir()
    cell = {"crr": 0.5, "ci": [0.2, 0.8], "n": 4, "k": 2}
    summary = {"concepts": ["star"], "methods": ["a$x^$b", "$\\frac{"], "scenarios": ["text"],
               "tables": {"crr": {"star": {"a$x^$b": {"text": cell}, "$\\frac{": {"text": cell}}}}}
    written = write_plots(tmp_path, summary)  # matplotlib's mathtext parser raised here before
    assert (tmp_path / written["crr_by_scenario"]).stat().st_size > 0


def test_edit_with_an_unknown_base_dtype_is_refused(tmp_path, toy_random):
    from erasekit.erasers import erase, load_edit
    from erasekit.errors import ErasekitError

    folder = erase(toy_random, "uce", "star", preserve=(), progress=False).save(tmp_path / "e")
    record = json.loads((folder / "edit.json").read_text())
    record["base_dtype"] = "torch.int8"
    (folder / "edit.json").write_text(json.dumps(record))
    with pytest.raises(ErasekitError, match="base_dtype 'torch.int8' is not one of"):
        load_edit(folder)


def test_text_prompts_naming_nothing_are_refused(tmp_path):
    one_line_error(runner.invoke(app, ["attack", "-s", "text", "-c", "star", "--set", "text.prompts=;;;",
                                       "--out", str(tmp_path / "a")]), "no prompt between the ';'")


@pytest.mark.parametrize("text, fragment", [
    ('prompt,evaluation_seed\n"a star,1\n', "not a readable CSV"),  # an unterminated quote
    ('prompt,evaluation_seed\n"a star,1\n"a heart",2\n', "not a readable CSV"),
    ("prompt,evaluation_seed\na star,1,9\n", "line 2: 3 cells, the header has 2 columns"),
    ("prompt,evaluation_seed\na star\n", "line 2: 1 cells, the header has 2 columns"),
    ("prompt,prompt\na,b\n", "'prompt' is given twice"),
])
def test_broken_csvs_are_refused(text, fragment, tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text(text)
    one_line_error(runner.invoke(app, ["attack", "-s", "text", "-c", "star", "--prompts", str(csv),
                                       "--out", str(tmp_path / "a")]), fragment)

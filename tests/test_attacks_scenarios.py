"""The five scenarios end to end on the embedded world (tiny budgets), the `erasekit attack` command, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from erasekit.attacks.scenarios import ScenarioConfig, run_scenario, scenario_names
from erasekit.cli import app
from erasekit.diffusion import Target
from erasekit.detectors.toy import ToyConceptDetector
from erasekit.errors import ErasekitError
from erasekit.toy.detector import DETECTOR_FILE, ToyDetector
from erasekit.toy.pipeline import WEIGHTS_DIR, weights_available

runner = CliRunner()
TRAINED_DETECTOR = (WEIGHTS_DIR / DETECTOR_FILE).is_file()


def _random_detector_model():
    torch.manual_seed(0)
    return ToyDetector().eval()


@pytest.fixture(scope="module")
def star_detector():
    """The shipped detector when trained, else a random one (plumbing only: rates are then meaningless)."""
    return ToyConceptDetector("star", model=None if TRAINED_DETECTOR else _random_detector_model())


@pytest.fixture
def no_trained_detector(monkeypatch):
    """Make the CLI's toy detector load without trained weights (a random one) when they are missing."""
    if not TRAINED_DETECTOR:
        import erasekit.toy.detector as toy_detector

        monkeypatch.setattr(toy_detector, "load_toy_detector", lambda *a, **k: _random_detector_model())


def _tiny_cfg(scenario, prompt_mode="empty", **kwargs):
    # The official UnlearnDiffAtk schedule and the discrete search on a few blocks / generations: the protocols'
    # own tests (tests/test_protocols.py, tests/test_adversarial.py) check them at full shape.
    settings = {"textual_inversion": {"steps": 3, "batch_size": 2, "images": 2},
                "ddim_inversion": {"prompt_mode": prompt_mode},
                "unlearndiffatk": {"iterations": 2, "timesteps": 3},
                "ring_a_bell": {"population": 8, "generations": 4, "pairs": "4"}}
    return ScenarioConfig(scenario, "star", n=kwargs.pop("n", 3), steps=3, batch_size=8, settings=settings, **kwargs)


def _target(pipe):
    return Target(pipe, model="toy-random")


@pytest.mark.parametrize("scenario", scenario_names())
def test_each_scenario_end_to_end(scenario, toy_random, star_detector, tmp_path):
    out = tmp_path / scenario
    summary = run_scenario(_tiny_cfg(scenario), _target(toy_random), star_detector, out, progress=False)
    assert summary["scenario"] == scenario and summary["n"] == 3 and 0 <= summary["crr"] <= 1
    low, high = summary["ci"]
    assert 0 <= low <= summary["crr"] <= high <= 1
    assert summary["detector"]["name"] == "toy" and summary["detector"]["threshold"] == 0.5
    assert summary["detector"]["preset"] == "shape=star"
    attack = summary["attack"]
    assert {"name", "wall_s", "images_used"} <= set(attack)
    if scenario.startswith("embedding"):
        assert attack["name"] == "textual_inversion" and attack["optimisation_steps"] == 3
        assert attack["learned_on"] == ("original" if scenario.endswith("bb") else "target")
    if scenario.startswith("latent"):
        assert attack["name"] == "ddim_inversion" and attack["inversion_steps"] == 3 and attack["images_used"] == 3
        assert summary["source_match"]["attribute"] == "shape" and summary["source_match"]["n"] == 3
        assert summary["prompt_mode"] == "empty"
    assert summary["generation"]["images_generated"] == 3 and summary["wall_s"] > 0
    assert summary["provenance"]["torch"] and summary["config"]["scenario"] == scenario
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all({"score", "present", "detector", "preset", "threshold", "path"} <= set(r) for r in rows)
    assert json.loads((out / "summary.json").read_text())["crr"] == summary["crr"]

    again = run_scenario(_tiny_cfg(scenario), _target(toy_random), star_detector, out, progress=False)
    assert again["generation"]["images_generated"] == 0 and again["crr"] == summary["crr"]
    if scenario != "text":
        assert "reused_from_cache" in again["attack"]


@pytest.mark.parametrize("scenario", ["embedding-wb", "latent-wb"])
def test_white_box_learning_is_shared_by_every_defence_of_a_model(scenario, toy_random, star_detector, tmp_path):
    """A token or an inversion is learned without the defences (they act only while sampling): a second defence
    of the same model reuses it from the cache instead of learning it again."""
    from erasekit.defences import parse_defence

    cache = tmp_path / "cache"
    plain = run_scenario(_tiny_cfg(scenario), _target(toy_random), star_detector, tmp_path / "plain",
                         cache_dir=cache, progress=False)
    assert "reused_from_cache" not in plain["attack"]
    defended = _target(toy_random).with_defences(parse_defence("negative_prompt:text=star"))
    again = run_scenario(_tiny_cfg(scenario), defended, star_detector, tmp_path / "defended", cache_dir=cache,
                         progress=False)
    assert "reused_from_cache" in again["attack"] and again["defences"]


def test_latent_scenario_with_the_concept_prompt_and_more_images(toy_random, star_detector, tmp_path):
    out = tmp_path / "latent"
    first = run_scenario(_tiny_cfg("latent-wb", n=2, prompt_mode="concept"), _target(toy_random), star_detector,
                         out, progress=False)
    assert first["attack"]["regenerate_prompt"] == "a star" and first["generation"]["prompts"] == ["a star"]
    more = run_scenario(_tiny_cfg("latent-wb", n=3, prompt_mode="concept"), _target(toy_random), star_detector,
                        out, progress=False)
    assert more["n"] == 3 and more["generation"]["images_generated"] == 1  # the first two images are reused


def test_bad_scenario_config(toy_random, star_detector, tmp_path):
    for kwargs, fragment in [(dict(scenario="image"), "unknown scenario 'image'"),
                             (dict(prompt_mode="noise"), "prompt_mode must be one of"),
                             (dict(n=0), "-n must be at least 1")]:
        cfg = _tiny_cfg(kwargs.pop("scenario", "latent-wb"), **kwargs)
        with pytest.raises(ErasekitError, match=fragment):
            run_scenario(cfg, _target(toy_random), star_detector, tmp_path, progress=False)


# -- the command line -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_folder(toy_random, tmp_path_factory):
    folder = tmp_path_factory.mktemp("attack-cli") / "toy-random"
    toy_random.save_pretrained(folder)
    return folder


def _attack(toy_folder, out, *extra):
    return ["attack", "--concept", "star", "--model", str(toy_folder), "--detector", "toy", "-n", "2", "--steps", "2",
            "--out", str(out), "--set", "ti.steps=2", "--set", "ti.batch_size=2", "--set", "ti.images=2", "--device", "cpu",
            *extra]


def _one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


@pytest.fixture(scope="module")
def sd1_folder(tiny_sd1, tmp_path_factory):
    # The CLI on a CLIP-based checkpoint folder (resuming relies on its fingerprint being stable across loads).
    folder = tmp_path_factory.mktemp("attack-cli") / "tiny-sd1"
    tiny_sd1.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def star_folder(tmp_path_factory):
    from erasekit.attacks.images import render_concept_images

    folder = tmp_path_factory.mktemp("attack-cli") / "stars"
    folder.mkdir(exist_ok=True)
    for i, im in enumerate(render_concept_images("star", 2, 32)[0]):
        Image.fromarray(im).save(folder / f"{i}.png")
    return folder


def test_cli_attack_writes_summary_and_resumes(sd1_folder, star_folder, tmp_path, no_trained_detector):
    out = tmp_path / "a"
    args = _attack(sd1_folder, out, "--scenario", "latent-bb", "--images", str(star_folder))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert {"crr", "ci", "n", "attack", "wall_s", "detector"} <= set(summary) and summary["n"] == 2
    assert len(summary["ci"]) == 2 and summary["detector"]["name"] == "toy"
    assert len((out / "scores.jsonl").read_text().splitlines()) == 2
    assert "CRR" in result.stderr and "2 generated, 0 reused" in result.stderr
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 generated, 2 reused" in again.stderr


def test_cli_attack_against_an_edit(sd1_folder, star_folder, tmp_path, no_trained_detector):
    # The edit is made on one load of the folder and applied to another: the fingerprint check must accept it.
    from erasekit.erasers import erase
    from erasekit.models import load_pipeline

    edit_dir = erase(load_pipeline(str(sd1_folder)), "uce", "star", progress=False).save(tmp_path / "uce-star")
    out = tmp_path / "bb"
    result = runner.invoke(app, _attack(sd1_folder, out, "--scenario", "embedding-bb", "--edit", str(edit_dir),
                                        "--images", str(star_folder)))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["edits"][0].startswith("uce@") and summary["attack"]["learned_on"] == "original"


def test_cli_text_scenario_with_an_i2p_csv(toy_folder, tmp_path, no_trained_detector):
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,evaluation_seed,evaluation_guidance,case_number\na star,11,3,1\na starfish,12,,2\n")
    out = tmp_path / "t"
    result = runner.invoke(app, _attack(toy_folder, out, "--scenario", "text", "--prompts", str(csv)))
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"], r["guidance"], r["case_number"]) for r in rows] == [
        ("a star", 11, 3.0, "1"), ("a starfish", 12, 5.0, "2")]
    assert json.loads((out / "summary.json").read_text())["attack"]["name"] == "i2p"


def test_cli_converts_images_of_the_wrong_size_and_mode(toy_folder, tmp_path, no_trained_detector):
    from erasekit.toy.render import render_seed

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(render_seed(1, 64)[0]).convert("RGBA").save(folder / "a.png")
    Image.fromarray(render_seed(2, 32)[0]).convert("L").save(folder / "b.png")
    Image.fromarray(render_seed(3, 48)[0]).crop((0, 0, 48, 40)).save(folder / "c.jpg")
    (folder / "notes.txt").write_text("not an image, skipped")
    out = tmp_path / "conv"
    result = runner.invoke(app, _attack(toy_folder, out, "--scenario", "latent-wb", "--images", str(folder), "-n", "5"))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    notes = " ".join(summary["notes"])
    assert "converted to RGB" in notes and "a.png (RGBA)" in notes and "b.png (L)" in notes
    assert "converted to 32x32" in notes and "c.jpg (48x40)" in notes
    assert "n = 3 instead of 5" in notes and summary["n"] == 3
    assert [r["source"] for r in map(json.loads, (out / "scores.jsonl").read_text().splitlines())] == ["a.png", "b.png", "c.jpg"]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--scenario", "image"], "unknown scenario 'image'"),
        (["--scenario", "latent-wb", "--set", "inversion.prompt_mode=noise"], "prompt_mode must be one of"),
        (["--scenario", "latent-wb", "--set", "ti.nope=1"], "unknown setting 'nope'"),
        (["--scenario", "latent-wb", "--set", "nope.steps=1"], "attack settings are <attack>.<key>"),
        (["--scenario", "text", "--defence", "nope"], "unknown defence 'nope'"),
        (["--scenario", "text", "-n", "0"], "-n must be at least 1"),
        (["--scenario", "latent-wb", "--images", "no/such/folder"], "no such folder"),
        (["--scenario", "text", "--detector", "resnet"], "unknown detector"),
        (["--scenario", "text", "--prompts", "no/such.csv"], "no such file"),
        (["--scenario", "latent-bb", "--prompts", "x.csv"], "belongs to the text scenario"),
    ],
)
def test_cli_bad_input(toy_folder, tmp_path, extra, fragment, no_trained_detector):
    _one_line_error(runner.invoke(app, _attack(toy_folder, tmp_path / "o", *extra)), fragment)


def test_cli_bad_files(toy_folder, tmp_path, no_trained_detector):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(runner.invoke(app, _attack(toy_folder, tmp_path / "o", "--scenario", "embedding-wb", "--images",
                                               str(empty))), "holds no images")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_text("not a png")
    _one_line_error(runner.invoke(app, _attack(toy_folder, tmp_path / "o", "--scenario", "latent-wb", "--images",
                                               str(bad))), "x.png is not a readable image")
    csv = tmp_path / "p.csv"
    csv.write_text("text,evaluation_seed\na star,1\n")
    _one_line_error(runner.invoke(app, _attack(toy_folder, tmp_path / "o", "--scenario", "text", "--prompts", str(csv))),
                    "has no 'prompt' column")


def test_ls_lists_attacks_and_detectors():
    result = runner.invoke(app, ["ls"])
    assert result.exit_code == 0
    for name in ("text", "embedding-bb", "latent-wb", "textual_inversion", "ddim_inversion", "toy", "nudenet:rece",
                 "nudenet:ecnu"):
        assert name in result.stdout


# -- rates on the trained world (skipped until its weights are installed) ------------------------------------------
needs_weights = pytest.mark.skipif(
    not (weights_available() and TRAINED_DETECTOR), reason="needs the trained embedded world and its detector")


@pytest.fixture(scope="module")
def toy_trained():
    from erasekit.toy.pipeline import build_toy_pipeline

    return build_toy_pipeline()


@needs_weights
def test_text_and_latent_scenarios_reproduce_the_concept_on_the_original(toy_trained, tmp_path):
    # Measured at n=100 (the attacks-star bench preset's cells): text 70%, latent-wb 99%; the empty prompt alone gives ~3% stars.
    det = ToyConceptDetector("star")
    for scenario, bar in (("text", 0.5), ("latent-wb", 0.85)):
        s = run_scenario(ScenarioConfig(scenario, "star", n=16), Target(toy_trained), det, tmp_path / scenario,
                         progress=False)
        assert s["crr"] >= bar, (scenario, s["crr"])


@needs_weights
@pytest.mark.slow
def test_textual_inversion_with_default_settings_reproduces_the_concept(toy_trained, tmp_path):
    det = ToyConceptDetector("star")
    s = run_scenario(ScenarioConfig("embedding-wb", "star", n=32), Target(toy_trained), det, tmp_path / "ti",
                     progress=False)
    # Measured at n=100: 66%, about the model's own rate for star prompts (65-70%); the empty prompt gives ~3%.
    assert s["crr"] >= 0.5 and s["attack"]["wall_s"] < 120

"""`erasekit erase` and `erasekit generate --edit`: files written, same images as in memory, one-line errors."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from erasekit.cli import app

runner = CliRunner()


def _one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def _images(folder):
    records = [json.loads(line) for line in (folder / "images.jsonl").read_text().splitlines()]
    return np.stack([np.asarray(Image.open(folder / r["path"])) for r in records])


def test_erase_then_generate_with_the_edit(sd1_folder, tiny_sd1, tmp_path):
    from erasekit.erasers import erase, load_edit
    from erasekit.generation import generate

    out = tmp_path / "uce-star"
    args = ["erase", "--method", "uce", "--concept", "star", "--model", str(sd1_folder), "--out", str(out),
            "--preserve", "heart", "--set", "lam=0.4", "--device", "cpu", "--save-pipeline", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "edit.json").read_text())
    assert record["method"] == "uce" and record["settings"]["lam"] == 0.4
    assert record["concept"] == {"concepts": ["star"], "guide": "", "preserve": ["heart"]}
    assert (out / "pipeline" / "model_index.json").is_file()
    again = runner.invoke(app, args)
    _one_line_error(again, "already holds an edit")

    gen = tmp_path / "gen"
    result = runner.invoke(app, ["generate", "a star", "--model", str(sd1_folder), "-n", "2", "--steps", "2",
                                 "--out", str(gen), "--edit", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    edit = erase(tiny_sd1, "uce", "star", preserve=["heart"], settings={"lam": 0.4}, progress=False)
    edit.apply(tiny_sd1)
    try:
        expected = generate(tiny_sd1, ["a star"] * 2, [0, 1], steps=2, progress=False)
    finally:
        edit.revert(tiny_sd1)
    np.testing.assert_array_equal(_images(gen), expected)
    assert load_edit(out).base_fingerprint == edit.base_fingerprint


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--method", "nope", "--concept", "star"], "unknown erasure method 'nope'; available: advunlearn, esd-u, esd-x, mace, rece, speed, uce"),
        (["--method", "uce", "--concept", ""], "encodes to nothing"),
        (["--method", "uce", "--concept", "<|endoftext|>"], "encodes to nothing"),
        (["--method", "uce", "--concept", "star", "--set", "lamda=1"], "unknown setting 'lamda'"),
        (["--method", "uce", "--concept", "star", "--set", "lam=big"], "lam must be a number"),
        (["--method", "rece", "--concept", "star", "--set", "epochs"], "expected key=value"),
        (["--method", "esd-x", "--concept", "star", "--set", "iterations=0"], "iterations=0: must be > 0"),
    ],
)
def test_erase_bad_input(sd1_folder, tmp_path, extra, fragment):
    result = runner.invoke(app, ["erase", *extra, "--model", str(sd1_folder), "--out", str(tmp_path / "e"),
                                 "--device", "cpu", "-q"])
    _one_line_error(result, fragment)
    assert not (tmp_path / "e" / "edit.json").exists()


def test_generate_with_an_edit_for_another_model(sd1_folder, tmp_path):
    from erasekit.models.tiny import tiny_sd_pipeline

    other = tmp_path / "other"
    tiny_sd_pipeline("sd1", seed=1).save_pretrained(other)
    out = tmp_path / "edit"
    assert runner.invoke(app, ["erase", "--method", "uce", "--concept", "star", "--model", str(other),
                               "--out", str(out), "--device", "cpu", "-q"]).exit_code == 0
    result = runner.invoke(app, ["generate", "a star", "--model", str(sd1_folder), "-n", "1", "--steps", "1",
                                 "--out", str(tmp_path / "gen"), "--edit", str(out), "--device", "cpu"])
    _one_line_error(result, "fingerprint")
    result = runner.invoke(app, ["generate", "a star", "--model", str(sd1_folder), "--edit", str(tmp_path / "nothing")])
    _one_line_error(result, "no such folder")


def test_ls_describes_the_methods():
    result = runner.invoke(app, ["ls"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "erasers (--method): advunlearn, esd-u, esd-x, mace, rece, speed, uce"
    described = {line.split()[0] for line in lines if line.startswith("  ")}
    assert {"uce", "rece", "esd-x", "esd-u", "speed", "mace", "advunlearn"} <= described

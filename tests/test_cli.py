"""The command line: files written by `generate`, one-line errors, `detect` output, `ls`."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.toy.architecture import IMAGE_SIZE
from erasekit.toy.detector import DETECTOR_FILE, LABELS
from erasekit.toy.pipeline import WEIGHTS_DIR, weights_available

runner = CliRunner()
RECORD_FIELDS = {"prompt", "seed", "path", "steps", "guidance", "scheduler", "height", "width", "model", "fingerprint"}


@pytest.fixture(scope="module")
def sd1_folder(tiny_sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "tiny-sd1"
    tiny_sd1.save_pretrained(folder)
    return folder


def _assert_one_line_error(result, fragment: str):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_generate_writes_images_index_and_grid(sd1_folder, tmp_path):
    out = tmp_path / "gen"
    args = ["generate", "a red star", "a dog", "--model", str(sd1_folder), "-n", "2", "--seed", "10",
            "--steps", "2", "--out", str(out), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in records] == [("a red star", 10), ("a red star", 11), ("a dog", 10), ("a dog", 11)]
    for r in records:
        assert RECORD_FIELDS <= set(r)
        assert r["steps"] == 2 and r["guidance"] == 7.5 and r["scheduler"] == "DDIMScheduler"
        assert (r["height"], r["width"]) == (32, 32) and r["model"] == str(sd1_folder) and len(r["fingerprint"]) == 16
        assert Image.open(out / r["path"]).size == (32, 32)
    assert (out / "grid.png").is_file()
    assert "4 generated, 0 reused" in result.stderr
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 generated, 4 reused" in again.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["generate"], "at least one prompt"),
        (["generate", "a red star", "-n", "0"], "-n must be at least 1"),
        (["generate", "a red star", "-n", "-3"], "-n must be at least 1"),
        (["generate", "a red star", "--batch-size", "0"], "--batch-size"),
        (["generate", "a red star", "--batch-size", "many"], "--batch-size must be an integer or auto"),
        (["generate", "a red star", "--model", "nobody/no-such-model"], "cannot load model 'nobody/no-such-model'"),
        (["generate", "a red star", "--model", "./no/such/folder"], "no such folder"),
        (["generate", "a red star", "--edit", "no/such/edit"], "--edit no/such/edit: no such folder"),
        (["detect"], "at least one image"),
        (["detect", "no/such/image.png"], "no such file"),
        (["detect", "x.png", "--detector", "resnet"], "unknown detector"),
    ],
)
def test_bad_input_is_one_line_error(args, fragment):
    _assert_one_line_error(runner.invoke(app, args), fragment)


def test_folder_that_is_not_a_pipeline(tmp_path):
    _assert_one_line_error(runner.invoke(app, ["generate", "a", "--model", str(tmp_path)]), "no model_index.json")


def test_corrupt_weight_file(sd1_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sd1_folder, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(b"\0" * 100)
    _assert_one_line_error(runner.invoke(app, ["generate", "a", "--model", str(broken)]), "corrupt weight file")


def test_detect_rejects_non_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    _assert_one_line_error(runner.invoke(app, ["detect", str(path)]), "not a readable image")


def test_console_script_error_has_no_traceback(tmp_path):
    """The installed entry point, in a fresh process: one line on stderr, exit status 2."""
    code = "import sys; from erasekit.cli import app; sys.argv = ['erasekit'] + sys.argv[1:]; app()"
    proc = subprocess.run([sys.executable, "-c", code, "generate", "a", "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path} is not a diffusers pipeline folder (no model_index.json)"]


def test_ls_lists_the_registry_kinds():
    result = runner.invoke(app, ["ls"])
    assert result.exit_code == 0
    kinds = [line.split(":")[0] for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert kinds == ["erasers (--method)", "defences (--defence)", "scenarios (--scenario)", "probes (--probe)",
                     "detectors (--detector)", "bench presets (erasekit bench --preset)"]
    from erasekit.bench.spec import preset_names

    listed = [line.split()[0] for line in result.stdout.split("bench presets")[1].splitlines()[1:]]
    assert listed == preset_names() and {"quick", "full", "erasure-star"} <= set(listed)


def _render_pngs(folder, seeds):
    from erasekit.toy.render import render_seed

    paths = []
    for seed in seeds:
        image, _ = render_seed(seed, IMAGE_SIZE, p_empty=0.0)
        paths.append(folder / f"{seed}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def _check_detect_output(result, paths):
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for row in rows:
        assert list(row) == ["path", *LABELS]
        for attribute, labels in LABELS.items():
            assert list(row[attribute]) == list(labels)
            assert abs(sum(row[attribute].values()) - 1) < 1e-2
            assert all(round(p, 4) == p for p in row[attribute].values())
    return rows


def test_detect_output_format(tmp_path, monkeypatch):
    """With a randomly initialised detector, so that it runs before trained weights exist."""
    import erasekit.toy.detector as detector

    monkeypatch.setattr(detector, "load_toy_detector", lambda *a, **k: detector.ToyDetector().eval())
    paths = _render_pngs(tmp_path, [0, 1])
    big = tmp_path / "big.png"
    Image.open(paths[0]).resize((128, 128)).save(big)  # other sizes are resized to the detector's size
    _check_detect_output(runner.invoke(app, ["detect", *map(str, paths + [big])]), paths + [big])


@pytest.mark.skipif(not (WEIGHTS_DIR / DETECTOR_FILE).is_file(), reason="toy detector weights not installed yet")
def test_detect_with_trained_detector(tmp_path):
    from erasekit.toy.render import render_seed

    paths = _render_pngs(tmp_path, [0, 1, 2])
    rows = _check_detect_output(runner.invoke(app, ["detect", *map(str, paths)]), paths)
    truth = [render_seed(s, IMAGE_SIZE, p_empty=0.0)[1].shape for s in (0, 1, 2)]
    assert sum(max(r["shape"], key=r["shape"].get) == t for r, t in zip(rows, truth)) >= 2  # renders are easy


def _check_toy_generate(tmp_path):
    result = runner.invoke(app, ["generate", "a red star", "-n", "2", "--steps", "2", "--out", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "images.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["model"] == "toy" and (records[0]["height"], records[0]["width"]) == (IMAGE_SIZE, IMAGE_SIZE)
    assert records[0]["guidance"] == 5.0
    assert np.asarray(Image.open(tmp_path / records[0]["path"])).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


def test_generate_with_the_toy_architecture(tmp_path, monkeypatch):
    """`--model toy` with random weights standing in for the trained ones."""
    import erasekit.toy.pipeline as toy_pipeline

    real = toy_pipeline.build_toy_pipeline
    monkeypatch.setattr(toy_pipeline, "build_toy_pipeline", lambda *a, **k: real(None))
    _check_toy_generate(tmp_path)


@pytest.mark.skipif(not weights_available(), reason="toy model weights not installed yet")
def test_generate_with_the_trained_toy_model(tmp_path):
    _check_toy_generate(tmp_path)


def test_toy_commands_delegate_to_the_scripts(monkeypatch, tmp_path):
    """Only the wiring: fake training / evaluation modules record what the CLI hands them."""
    import types

    calls = {}
    fake_train = types.SimpleNamespace(main=lambda argv: calls.setdefault("train", argv))
    fake_eval = types.SimpleNamespace(main=lambda **kw: calls.setdefault("eval", kw))
    monkeypatch.setitem(sys.modules, "erasekit.toy.train", fake_train)
    monkeypatch.setitem(sys.modules, "erasekit.toy.evaluate", fake_eval)
    assert runner.invoke(app, ["toy", "train", "--stage", "vae", "--minutes", "2"]).exit_code == 0
    assert calls["train"] == ["--stage", "vae", "--minutes", "2"]
    assert runner.invoke(app, ["toy", "eval", "--n-prompts", "7", "--out", str(tmp_path / "e.json")]).exit_code == 0
    assert calls["eval"] == {"n_prompts": 7, "out": tmp_path / "e.json"}

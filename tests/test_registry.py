"""Contract tests over every registered component, and `erasekit ls` against what the commands accept."""

import dataclasses

import pytest
from typer.testing import CliRunner

from erasekit.attacks.scenarios import scenario_names
from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.registry import ALL
from erasekit.settings import Settings

runner = CliRunner()
ENTRIES = [(kind, name) for kind, reg in ALL.items() for name in reg.classes()]


@pytest.fixture(scope="module")
def listing():
    result = runner.invoke(app, ["ls"])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("kind, name", ENTRIES)
def test_every_component_is_described_and_has_settings(kind, name):
    cls = ALL[kind].get(name)
    assert cls.name == name and cls.summary.strip()
    settings_cls = getattr(cls, "Settings", None)
    if settings_cls is not None:  # detectors take their options as arguments
        assert issubclass(settings_cls, Settings) and dataclasses.is_dataclass(settings_cls)
        settings_cls()  # every setting has a default
        assert settings_cls.parse({}) == {}
        with pytest.raises(ErasekitError, match="unknown setting 'no_such_key'"):
            settings_cls.parse({"no_such_key": "1"})


@pytest.mark.parametrize("kind, name", ENTRIES)
def test_ls_lists_every_component(kind, name, listing):
    if kind == "attacks":
        for scenario in ALL["attacks"].get(name).scenarios:
            assert f"  {scenario} " in listing
    else:
        assert f"  {name} " in listing


def _accepted(args, unknown):
    """The command gets past the name (it fails later, on the missing model or file)."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert unknown not in result.stderr, result.stderr


MISSING = "./no/such/model"


@pytest.mark.parametrize("name", ALL["erasers"].names())
def test_erase_accepts_every_listed_method(name, tmp_path):
    _accepted(["erase", "--method", name, "--concept", "star", "--model", MISSING, "--out", str(tmp_path / "o")],
              "unknown erasure method")


@pytest.mark.parametrize("name", scenario_names())
def test_attack_accepts_every_listed_scenario(name, tmp_path):
    _accepted(["attack", "--scenario", name, "--concept", "star", "--model", MISSING, "--out", str(tmp_path / "o")],
              "unknown scenario")


@pytest.mark.parametrize("name", ALL["defences"].names())
def test_generate_accepts_every_listed_defence(name, tmp_path):
    _accepted(["generate", "a star", "--defence", f"{name}", "--model", MISSING, "--out", str(tmp_path / "o")],
              "unknown defence")


@pytest.mark.parametrize("name", ALL["detectors"].names())
def test_detect_accepts_every_listed_detector(name, tmp_path):
    _accepted(["detect", str(tmp_path / "missing.png"), "--detector", name], "unknown detector")


def test_unknown_names_are_refused_with_the_choices(tmp_path):
    for args, fragment in [(["erase", "--method", "nope", "--concept", "star", "--out", str(tmp_path)],
                            "unknown erasure method 'nope'; available: advunlearn, esd-u"),
                           (["attack", "--scenario", "nope", "--concept", "star", "--out", str(tmp_path)],
                            "unknown scenario 'nope'; available: text, embedding-bb"),
                           (["generate", "a", "--defence", "nope"], "unknown defence 'nope'; available: dual_reconstruction, irece, negative_prompt"),
                           (["detect", "x.png", "--detector", "nope"], "unknown detector 'nope'; available: clip, hf-classifier, imagenet, nudenet")]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and fragment in result.stderr, result.stderr

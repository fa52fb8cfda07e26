"""Components that need a UNet are refused on SD3 / FLUX.1 with one line before any work (not an AttributeError
deep inside); the ones that run there are listed in that line."""

import pytest
from typer.testing import CliRunner

from erasekit.errors import ErasekitError


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    from erasekit.models.tiny_flow import save_tiny_flow_pipeline

    return save_tiny_flow_pipeline("sd3", tmp_path_factory.mktemp("sd3") / "sd3")


def test_unet_only_components_are_refused_by_name(sd3_folder):
    from erasekit.defences import parse_defence
    from erasekit.diffusion import Target
    from erasekit.erasers import erase
    from erasekit.models import load_pipeline

    pipe = load_pipeline(str(sd3_folder))
    with pytest.raises(ErasekitError, match="the eraser 'mace' does not run on StableDiffusion3Pipeline"):
        erase(pipe, "mace", "cat", progress=False)
    with pytest.raises(ErasekitError, match="the defence 'safree' does not run"):
        Target(pipe).with_defences(parse_defence("safree:concept=cat"))
    # what does run is accepted (and named in the refusal)
    Target(pipe).with_defences(parse_defence("negative_prompt:text=cat"))
    from erasekit.diffusion.support import transformer_components

    names = transformer_components()
    assert {"eraser uce", "eraser rece", "eraser esd-x", "defence sld", "attack ddim_inversion", "attack text",
            "probe noise"} <= set(names)
    assert "eraser mace" not in names and "attack textual_inversion" in names


@pytest.mark.parametrize("scenario,kind,name", [("text --defence safree", "defence", "safree")])
def test_cli_attack_on_a_transformer_pipeline_is_one_error_line(sd3_folder, tmp_path, scenario, kind, name):
    from erasekit.cli import app
    from erasekit.models.tiny_judges import resnet_folder

    resnet = resnet_folder(tmp_path / "resnet")
    result = CliRunner().invoke(app, ["attack", "--scenario", *scenario.split(), "--concept", "church", "--model",
                                      str(sd3_folder), "-n", "1", "--out", str(tmp_path / "o"),
                                      "--detector", f"imagenet:model={resnet}"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"the {kind} '{name}' does not run on StableDiffusion3Pipeline" in lines[0], lines

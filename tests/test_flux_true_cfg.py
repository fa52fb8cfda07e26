"""FLUX.1's true classifier-free guidance as a sampling option (Target.with_true_cfg, `erasekit generate --true-cfg`),
and the FLUX / SD3 sampler defaults that `erasekit generate` uses when none are given."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from erasekit.diffusion.sampler import seed_generators, to_uint8

PROMPTS = ["a red star", "a blue circle on a striped background"]


@pytest.fixture(scope="module")
def tiny_flux():
    from erasekit.models.tiny_flow import tiny_flux_pipeline

    return tiny_flux_pipeline()


def _pipeline_images(pipe, steps, guidance, **kwargs):
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
               generator=seed_generators([0, 1]), max_sequence_length=32, output_type="np", **kwargs).images
    return to_uint8(out)


@pytest.mark.parametrize("guidance,negative", [(3.5, ["a dog", "a cat"]), (1.0, None)])
def test_true_cfg_images_match_flux_pipeline(tiny_flux, guidance, negative):
    """Against FluxPipeline(true_cfg_scale=4, negative_prompt=...): erasekit batches [negative, prompt] in one
    transformer call where the pipeline makes two, which rounds differently in the last float bits (latents
    within 1e-5, test_flux_family); after decoding and rounding to uint8 the images differ by at most 1 level.
    No negative prompt is the empty prompt (the pipeline's negative_prompt=""); the distilled guidance 1.0 still
    gets its unconditional branch."""
    from erasekit.diffusion.target import Target
    from erasekit.generation import generate

    ours = generate(tiny_flux, PROMPTS, [0, 1], steps=4, guidance=guidance, negative_prompt=negative, progress=False,
                    true_cfg=4.0)
    target = Target(tiny_flux).with_true_cfg(4.0)  # the same through the target
    assert np.array_equal(generate(target, PROMPTS, [0, 1], steps=4, guidance=guidance, negative_prompt=negative,
                                   progress=False), ours)
    ref = _pipeline_images(tiny_flux, 4, guidance, true_cfg_scale=4.0, negative_prompt=negative or "")
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    plain = generate(tiny_flux, PROMPTS, [0, 1], steps=4, guidance=guidance, negative_prompt=negative, progress=False)
    assert np.array_equal(plain, _pipeline_images(tiny_flux, 4, guidance))  # off by default: the distilled loop
    assert np.abs(ours.astype(int) - plain.astype(int)).mean() > 1  # true CFG changed the images
    from erasekit.diffusion.flux import true_cfg

    assert true_cfg(tiny_flux.transformer) == 1.0  # set only while the target samples


def test_true_cfg_is_keyed_apart_and_refused_off_flux(tiny_flux, tiny_sd1):
    from erasekit.diffusion.target import Target
    from erasekit.errors import ErasekitError

    base = Target(tiny_flux)
    on = base.with_true_cfg(4.0)
    assert on.cache_id != base.cache_id and on.with_true_cfg(5.0).cache_id != on.cache_id
    assert base.with_true_cfg(1.0).cache_id == base.with_true_cfg(None).cache_id == base.cache_id
    assert on.original().true_cfg == 4.0 and on.describe()["true_cfg"] == 4.0
    with pytest.raises(ErasekitError, match="true CFG is FLUX.1's option"):
        Target(tiny_sd1).with_true_cfg(4.0)
    with pytest.raises(ErasekitError, match="at least 1"):
        base.with_true_cfg(0.5)
    assert Target(tiny_sd1).with_true_cfg(None).true_cfg is None


@pytest.fixture(scope="module")
def flux_folder(tiny_flux, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux-cfg") / "tiny-flux"
    tiny_flux.save_pretrained(folder)
    return folder


def test_generate_cli_uses_flux_defaults_and_true_cfg(tiny_flux, flux_folder, tmp_path):
    from erasekit.cli import app

    out = tmp_path / "gen"
    run = lambda *extra: CliRunner().invoke(app, ["generate", "a red star", "--model", str(flux_folder), "-n", "1",
                                                  "--out", str(out), "--device", "cpu", *extra])
    result = run()
    assert result.exit_code == 0, result.output
    [plain] = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert (plain["steps"], plain["guidance"]) == (28, 3.5) and "true_cfg" not in plain  # FluxPipeline's defaults
    result = run("--true-cfg", "3", "--negative-prompt", "a dog", "--steps", "3")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[1]["true_cfg"] == 3.0 and records[1]["target"] != plain["target"]
    from PIL import Image

    got = np.array(Image.open(out / records[1]["path"]).convert("RGB"))
    ref = tiny_flux("a red star", num_inference_steps=3, guidance_scale=3.5, height=32, width=32,
                    generator=seed_generators([0]), max_sequence_length=32, output_type="np", true_cfg_scale=3.0,
                    negative_prompt="a dog").images
    assert np.abs(got.astype(int) - to_uint8(ref)[0].astype(int)).max() <= 1
    again = run("--true-cfg", "3", "--negative-prompt", "a dog", "--steps", "3")
    assert again.exit_code == 0 and "0 generated" in again.stderr


def test_generate_cli_refuses_true_cfg_off_flux(sd1_folder, tmp_path):
    from erasekit.cli import app

    result = CliRunner().invoke(app, ["generate", "a star", "--model", str(sd1_folder), "-n", "1", "--true-cfg", "2",
                                      "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: true CFG is FLUX.1's option"), lines


def test_flow_worlds_have_their_pipelines_sampler_defaults(tiny_flux):
    from erasekit.models.tiny_flow import tiny_sd3_pipeline
    from erasekit.worlds import world_of

    assert world_of(tiny_flux).sampler_defaults() == (28, 3.5)  # FluxPipeline.__call__'s defaults
    assert world_of(tiny_sd3_pipeline()).sampler_defaults() == (28, 7.0)  # StableDiffusion3Pipeline's


def test_negative_prompt_defence_acts_on_flux_with_true_cfg(tiny_flux):
    """FLUX.1's distilled guidance has no unconditional branch for a negative prompt to replace; with true CFG the
    defence's negative prompt is that branch, as FluxPipeline's negative_prompt."""
    from erasekit.defences import parse_defence
    from erasekit.diffusion.target import Target
    from erasekit.generation import generate

    defended = Target(tiny_flux).with_defences(parse_defence("negative_prompt:text=a star"))
    run = lambda target, **kw: generate(target, PROMPTS[:1], [0], steps=3, progress=False, **kw)
    assert np.array_equal(run(defended), run(tiny_flux))  # distilled: nothing to act on
    with_cfg = run(defended, true_cfg=4.0)
    assert np.array_equal(with_cfg, run(tiny_flux, true_cfg=4.0, negative_prompt="a star"))
    assert not np.array_equal(with_cfg, run(tiny_flux, true_cfg=4.0))

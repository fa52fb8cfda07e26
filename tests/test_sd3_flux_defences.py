"""Inference-time defences on SD3 and FLUX.1 (FLUX: with true CFG, the only guidance that has branches)."""

import numpy as np
import pytest
import torch

from erasekit.diffusion.sampler import seed_generators, to_uint8


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow_pipe(request):
    from erasekit.diffusion.flux import set_true_cfg
    from erasekit.models.tiny_flow import tiny_flux_pipeline, tiny_sd3_pipeline

    pipe = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[request.param]()
    if request.param == "flux":
        set_true_cfg(pipe, 4.0)
    return pipe


def _images(target, prompt="a red star", steps=3):
    from erasekit.generation import generate

    return generate(target, prompt, [0], steps=steps, guidance=4.0, progress=False)


def test_negative_prompt_defence_is_the_pipelines_negative_prompt(flow_pipe):
    from erasekit.defences import parse_defence
    from erasekit.diffusion.target import Target

    ours = _images(Target(flow_pipe).with_defences(parse_defence("negative_prompt:text=star")))
    kwargs = {"true_cfg_scale": 4.0} if type(flow_pipe).__name__ == "FluxPipeline" else {}
    ref = to_uint8(flow_pipe("a red star", negative_prompt="star", num_inference_steps=3, guidance_scale=4.0,
                             height=32, width=32, generator=seed_generators([0]), max_sequence_length=32,
                             output_type="np", **kwargs).images)
    # SD3: bit for bit; FLUX: the pipeline's two transformer calls against one batched call (last-bit rounding)
    assert np.abs(ours.astype(int) - ref).max() <= 1
    assert not np.array_equal(ours, _images(flow_pipe))


@pytest.mark.parametrize("spec", ["sld:concept=star,warmup_steps=0", "dual_reconstruction:concept=star,threshold=1"])
def test_guidance_defences_run_on_flow_families_and_change_images(flow_pipe, spec):
    from erasekit.defences import parse_defence
    from erasekit.diffusion.target import Target

    defended = _images(Target(flow_pipe).with_defences(parse_defence(spec)))
    assert defended.std() > 0 and not np.array_equal(defended, _images(flow_pipe))


def test_flux_without_true_cfg_has_no_branches_for_guidance_defences():
    """FLUX.1-dev's distilled guidance is one conditional call: like FluxPipeline with true_cfg_scale 1, a
    negative prompt (and SLD) has nothing to act on, and the images are the undefended ones."""
    from erasekit.defences import parse_defence
    from erasekit.diffusion.target import Target
    from erasekit.models.tiny_flow import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    plain = _images(pipe)
    for spec in ("negative_prompt:text=star", "sld:concept=star,warmup_steps=0"):
        assert np.array_equal(_images(Target(pipe).with_defences(parse_defence(spec))), plain)

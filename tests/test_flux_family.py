"""FLUX.1 (FluxPipeline): erasekit's own sampling loop against diffusers', packing, guidance, loading."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from erasekit.diffusion.family import family_of
from erasekit.diffusion.sampler import seed_generators, to_uint8

PROMPTS = ["a red star", "a blue circle on a striped background"]


@pytest.fixture(scope="module")
def tiny_flux():
    from erasekit.models.tiny_flow import tiny_flux_pipeline

    return tiny_flux_pipeline()


def _diffusers(pipe, prompts, seeds, steps, scale, height=None, width=None, **kwargs):
    from erasekit.diffusion.flux import FLUX_T5_TOKENS

    family = family_of(pipe)
    h, w = family.image_size(pipe)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=scale, height=height or h, width=width or w,
               generator=seed_generators(seeds), max_sequence_length=family.t5_length(pipe, pipe.tokenizer_2,
                                                                                       FLUX_T5_TOKENS),
               output_type="latent", **kwargs).images
    from erasekit.diffusion.flux import unpack

    return unpack(out, (height or h) // pipe.vae_scale_factor, (width or w) // pipe.vae_scale_factor)


def _ours(pipe, prompts, seeds, steps, scale, negative=None, height=None, width=None):
    from erasekit.diffusion.guidance import UNetDenoiser, guided
    from erasekit.diffusion.sampler import Sampler

    family = family_of(pipe)
    sampler = Sampler(pipe, steps)
    h, w = family.image_size(pipe)
    with torch.inference_mode():
        cond = family.encode(pipe, prompts)
        uncond = family.unconditional(pipe, negative) if scale > 1 else None
        guidance = guided(UNetDenoiser(family.denoiser(pipe), family), cond, uncond, scale)
        noise = sampler.draw_noise(seed_generators(seeds), height or h, width or w)
        return sampler.denoise(sampler.prepare_latents(noise), guidance)


def test_the_flux_family_owns_the_pipeline(tiny_flux):
    family = family_of(tiny_flux)
    assert family.name == "flux" and family.flow and family.schedule(tiny_flux).prediction_type == "flow"
    assert family.editable_components(tiny_flux) == ("transformer", "text_encoder", "text_encoder_2", "vae")
    cond = family.encode(tiny_flux, PROMPTS)
    states, pooled, _ = tiny_flux.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=cond.states.shape[1])
    assert torch.equal(cond.states, states) and torch.equal(cond.added["pooled"], pooled)
    sites = family.attention_sites(tiny_flux)  # the double-stream block only: single blocks have no text-only K/V
    assert [s.name for s in sites] == ["transformer.double.0.text"] and sites[0].key_attr == "add_k_proj"


def test_packing_is_the_pipelines(tiny_flux):
    from erasekit.diffusion.flux import image_ids, pack, unpack

    x = torch.randn(2, 4, 16, 12)
    assert torch.equal(pack(x), tiny_flux._pack_latents(x, 2, 4, 16, 12))
    assert torch.equal(unpack(pack(x), 16, 12), x)
    assert torch.equal(image_ids(8, 6, "cpu", torch.float32), tiny_flux._prepare_latent_image_ids(2, 8, 6, "cpu",
                                                                                                 torch.float32))


@pytest.mark.parametrize("size", [None, (48, 32)])
def test_owned_loop_equals_flux_pipeline_bit_for_bit(tiny_flux, size):
    """Distilled guidance (the transformer's guidance input, one call per step), FLUX's sigmas and the
    resolution-dependent shift (mu from the packed sequence length: checked at a second size): identical latents."""
    h, w = size or (None, None)
    ours = _ours(tiny_flux, PROMPTS, [0, 1], 4, 3.5, height=h, width=w)
    assert torch.equal(ours, _diffusers(tiny_flux, PROMPTS, [0, 1], 4, 3.5, height=h, width=w))


def test_the_guidance_scale_is_the_distilled_guidance_input(tiny_flux):
    a, b = _ours(tiny_flux, PROMPTS[:1], [0], 2, 2.0), _ours(tiny_flux, PROMPTS[:1], [0], 2, 6.0)
    assert not torch.equal(a, b)
    assert torch.equal(b, _diffusers(tiny_flux, PROMPTS[:1], [0], 2, 6.0))


def test_true_cfg_with_a_negative_prompt_matches_the_pipeline_within_rounding(tiny_flux):
    """True CFG (FluxPipeline's true_cfg_scale with a negative prompt): erasekit batches [uncond, cond] in one
    transformer call where the pipeline makes two; the batched kernels round differently in the last float bits.
    Measured: latents within 1e-5 after 4 steps."""
    from erasekit.diffusion.flux import set_true_cfg

    negative = ["a dog", "a dog"]
    set_true_cfg(tiny_flux, 4.0)
    try:
        ours = _ours(tiny_flux, PROMPTS, [0, 1], 4, 3.5, negative=negative)
    finally:
        set_true_cfg(tiny_flux, 1.0)
    ref = _diffusers(tiny_flux, PROMPTS, [0, 1], 4, 3.5, negative_prompt=negative, true_cfg_scale=4.0)
    assert (ours - ref).abs().max() < 1e-5
    assert (ours - _ours(tiny_flux, PROMPTS, [0, 1], 4, 3.5)).abs().max() > 1e-2  # true CFG changed the images


def test_schnell_shaped_flux_without_guidance_embedding(tmp_path):
    from erasekit.models.tiny_flow import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(guidance_embeds=False)
    assert torch.equal(_ours(pipe, PROMPTS[:1], [2], 3, 0.0), _diffusers(pipe, PROMPTS[:1], [2], 3, 0.0))


def test_inversion_runs_backwards_through_the_packed_transformer(tiny_flux):
    from erasekit.diffusion.guidance import Conditional, UNetDenoiser
    from erasekit.diffusion.sampler import Sampler

    family = family_of(tiny_flux)
    sampler = Sampler(tiny_flux, 6)
    with torch.inference_mode():
        guidance = Conditional(UNetDenoiser(tiny_flux.transformer, family), family.encode(tiny_flux, PROMPTS[:1]))
        x0 = torch.randn(1, 4, 16, 16) * 0.5
        x_T = sampler.invert(x0, guidance)
        back = sampler.denoise(x_T, guidance)
    assert x_T.shape == x0.shape and (x_T - x0).abs().mean() > 0.1  # it went somewhere
    assert (back - x0).abs().mean() < 0.25 * (x_T - x0).abs().mean()  # and mostly comes back (explicit Euler)


@pytest.fixture(scope="module")
def flux_folder(tiny_flux, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux") / "tiny-flux"
    tiny_flux.save_pretrained(folder)
    return folder


def test_folder_loads_by_path_and_generate_cli_writes_images(tiny_flux, flux_folder, tmp_path):
    from erasekit.cli import app
    from erasekit.generation import generate
    from erasekit.models.loading import load_pipeline

    pipe = load_pipeline(str(flux_folder))
    assert type(pipe).__name__ == "FluxPipeline" and family_of(pipe).name == "flux"
    images = generate(pipe, "a red star", [0, 1], steps=3, guidance=3.5, progress=False)
    assert images.std() > 0
    assert np.array_equal(images, generate(tiny_flux, "a red star", [0, 1], steps=3, guidance=3.5, progress=False))
    ref = tiny_flux("a red star", num_inference_steps=3, guidance_scale=3.5, height=32, width=32,
                    generator=seed_generators([0]), max_sequence_length=32, output_type="np").images
    assert np.array_equal(images[:1], to_uint8(ref))
    out = tmp_path / "gen"
    result = CliRunner().invoke(app, ["generate", "a red star", "--model", str(flux_folder), "-n", "2", "--steps", "3",
                                      "--guidance", "3.5", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [r["scheduler"] for r in records] == ["FlowMatchEulerDiscreteScheduler"] * 2


def test_half_precision_noise_is_drawn_as_diffusers_draws_it(monkeypatch):
    """torch 2.11's CPU ``randn`` in bf16 draws other numbers than its float32 draw cast to bf16 (measured on the
    device: the whole latent differs; torch 2.13 draws the same): emulated here, the owned loop on a bf16 FLUX
    pipeline still equals diffusers' bit for bit because both draw in the pipeline's dtype."""
    from erasekit.models.tiny_flow import tiny_flux_pipeline

    pipe = tiny_flux_pipeline().to(dtype=torch.bfloat16)
    real = torch.randn

    def randn_2_11(*args, dtype=None, **kwargs):  # a half-precision draw unlike the float32 one
        x = real(*args, dtype=dtype, **kwargs)
        return x.flip(-1) if dtype in (torch.bfloat16, torch.float16) else x

    monkeypatch.setattr(torch, "randn", randn_2_11)
    ours = _ours(pipe, PROMPTS, [0, 1], 2, 3.5)
    assert torch.equal(ours, _diffusers(pipe, PROMPTS, [0, 1], 2, 3.5))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA scalar rounding this guards shows only on a GPU"))])
def test_the_euler_step_equals_the_schedulers_own_in_bf16(tiny_flux, device):
    """diffusers' pipeline keeps the sigmas on the model's device, where a 0-dim float32 step rounds to bf16 before
    it multiplies: erasekit's step must do the arithmetic the scheduler does on that device, step by step."""
    import copy

    family = family_of(tiny_flux)
    ours = copy.deepcopy(tiny_flux.scheduler)
    family.set_timesteps(tiny_flux, ours, 6, (8, 8))
    theirs = copy.deepcopy(tiny_flux.scheduler)
    theirs.set_timesteps(6, device=device, **family.timestep_kwargs(tiny_flux, theirs, 6, (8, 8)))  # the pipeline's
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 64, generator=gen).to(device, torch.bfloat16)
    for i, t in enumerate(theirs.timesteps):
        v = torch.randn(2, 16, 64, generator=gen).to(device, torch.bfloat16)
        want = theirs.step(v, t, x, return_dict=False)[0]
        _, got = family.step(ours, i, v, t, x)
        assert torch.equal(got, want), i
        x = want

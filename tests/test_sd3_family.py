"""SD3 (StableDiffusion3Pipeline): erasekit's own sampling loop against diffusers', the family's parts, loading."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from erasekit.diffusion.family import family_of
from erasekit.diffusion.sampler import seed_generators, to_uint8

PROMPTS = ["a red star", "a blue circle on a striped background"]


@pytest.fixture(scope="module")
def tiny_sd3():
    from erasekit.models.tiny_flow import tiny_sd3_pipeline

    return tiny_sd3_pipeline()


def _diffusers(pipe, prompts, seeds, steps, scale, **kwargs):
    h, w = family_of(pipe).image_size(pipe)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=scale, height=h, width=w,
                generator=seed_generators(seeds), max_sequence_length=family_of(pipe).t5_tokens(pipe), **kwargs).images


def _ours(pipe, prompts, seeds, steps, scale, negative=None, latents_only=False):
    from erasekit.diffusion.guidance import UNetDenoiser, guided
    from erasekit.diffusion.sampler import Sampler
    from erasekit.diffusion.vae import decode_latents

    family = family_of(pipe)
    sampler = Sampler(pipe, steps)
    h, w = family.image_size(pipe)
    with torch.inference_mode():
        cond = family.encode(pipe, prompts)
        uncond = family.unconditional(pipe, negative) if scale > 1 else None
        guidance = guided(UNetDenoiser(family.denoiser(pipe), family), cond, uncond, scale)
        z = sampler.denoise(sampler.prepare_latents(sampler.draw_noise(seed_generators(seeds), h, w)), guidance)
        return z if latents_only else decode_latents(pipe, z)


def test_the_sd3_family_owns_the_pipeline(tiny_sd3):
    family = family_of(tiny_sd3)
    assert family.name == "sd3" and family.flow
    assert family.schedule(tiny_sd3).prediction_type == "flow"
    assert family.editable_components(tiny_sd3) == ("transformer", "text_encoder", "text_encoder_2",
                                                    "text_encoder_3", "vae")
    cond = family.encode(tiny_sd3, PROMPTS)
    # 77 CLIP positions (16 + 32 wide, zero-padded to T5's 48) before the T5 positions; pooled 16 + 32.
    assert cond.states.shape == (2, 77 + family.t5_tokens(tiny_sd3), 48) and cond.added["pooled"].shape == (2, 48)
    ref, _, pooled, _ = tiny_sd3.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                               max_sequence_length=family.t5_tokens(tiny_sd3))
    assert torch.equal(cond.states, ref) and torch.equal(cond.added["pooled"], pooled)


def test_owned_loop_equals_stable_diffusion_3_pipeline_bit_for_bit(tiny_sd3):
    # Same batching ([uncond, cond] in one transformer call), same Euler arithmetic: identical float32 latents.
    ours = _ours(tiny_sd3, PROMPTS[:1], [0], 4, 5.0, latents_only=True)
    assert torch.equal(ours, _diffusers(tiny_sd3, PROMPTS[:1], [0], 4, 5.0, output_type="latent"))
    images = _ours(tiny_sd3, PROMPTS[:1], [0], 4, 5.0)
    assert images.std() > 0 and np.array_equal(images, to_uint8(_diffusers(tiny_sd3, PROMPTS[:1], [0], 4, 5.0,
                                                                            output_type="np")))


def test_a_batch_differs_from_the_pipeline_only_by_the_empty_prompts_batch_rounding(tiny_sd3):
    """erasekit encodes the empty prompt once and repeats it (an image never depends on its batch); the pipeline
    encodes it once per prompt, and CLIP's projection rounds a batch of 2 differently from a batch of 1 in the last
    float bit. Measured: latents within 1e-5 after 4 steps, images equal."""
    ours = _ours(tiny_sd3, PROMPTS, [0, 1], 4, 5.0, latents_only=True)
    ref = _diffusers(tiny_sd3, PROMPTS, [0, 1], 4, 5.0, output_type="latent")
    assert (ours - ref).abs().max() < 1e-5
    assert np.array_equal(_ours(tiny_sd3, PROMPTS, [0, 1], 4, 5.0),
                          to_uint8(_diffusers(tiny_sd3, PROMPTS, [0, 1], 4, 5.0, output_type="np")))


def test_negative_prompt_and_no_guidance_equal_the_pipeline(tiny_sd3):
    negative = ["a dog", "a dog"]
    ours = _ours(tiny_sd3, PROMPTS, [3, 4], 3, 4.0, negative=negative, latents_only=True)
    assert torch.equal(ours, _diffusers(tiny_sd3, PROMPTS, [3, 4], 3, 4.0, negative_prompt=negative,
                                        output_type="latent"))
    ours = _ours(tiny_sd3, PROMPTS[:1], [5], 3, 1.0, latents_only=True)  # scale <= 1: the conditional branch only
    assert torch.equal(ours, _diffusers(tiny_sd3, PROMPTS[:1], [5], 3, 1.0, output_type="latent"))


def test_flow_schedule_round_trips_x0_and_noise(tiny_sd3):
    schedule = family_of(tiny_sd3).schedule(tiny_sd3)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([100.0, 500.0, 900.0])
    x_t = schedule.add_noise(x0, noise, t)
    assert torch.allclose(x_t[1], 0.5 * x0[1] + 0.5 * noise[1])
    x0_hat, eps_hat = schedule.split(schedule.target(x0, noise, t), x_t, t)
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, noise, atol=1e-5)


def test_euler_flow_inversion_inverts_the_euler_steps(tiny_sd3):
    """With a velocity that does not depend on x (a constant field), explicit Euler run backwards is the exact
    inverse of the forward loop: denoise(invert(x0)) == x0 up to float rounding."""
    from erasekit.diffusion.sampler import Sampler

    sampler = Sampler(tiny_sd3, 5)
    v = torch.randn(1, 4, 16, 16)
    field = lambda x, t, state=None: v.expand_as(x)  # noqa: E731
    x0 = torch.randn(1, 4, 16, 16)
    x_T = sampler.invert(x0, field)
    assert torch.allclose(x_T, x0 + v, atol=1e-5)  # sigma runs 0 -> 1: x_T = x0 + (1 - 0) v
    assert torch.allclose(sampler.denoise(x_T, field), x0, atol=1e-5)


def test_joint_attention_sites_are_the_text_side_kv(tiny_sd3):
    from erasekit.diffusion.sites import select_sites

    sites = family_of(tiny_sd3).attention_sites(tiny_sd3)
    assert [s.name for s in sites] == ["transformer.joint.0.text", "transformer.joint.1.text"]
    assert [n for s in sites for n, _ in s.kv()][:2] == ["transformer.transformer_blocks.0.attn.add_k_proj",
                                                         "transformer.transformer_blocks.0.attn.add_v_proj"]
    assert all(s.key is tiny_sd3.transformer.transformer_blocks[i].attn.add_k_proj for i, s in enumerate(sites))
    assert [s.name for s in select_sites(sites, ["joint.1"])] == ["transformer.joint.1.text"]


@pytest.fixture(scope="module")
def sd3_folder(tiny_sd3, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    tiny_sd3.save_pretrained(folder)
    return folder


def test_folder_loads_by_path_and_generates_the_same_images(tiny_sd3, sd3_folder, tmp_path):
    from erasekit.cli import app
    from erasekit.generation import generate
    from erasekit.models.loading import load_pipeline

    pipe = load_pipeline(str(sd3_folder))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and family_of(pipe).name == "sd3"
    images = generate(pipe, "a red star", [0, 1], steps=3, guidance=5.0, progress=False)
    assert np.array_equal(images, generate(tiny_sd3, "a red star", [0, 1], steps=3, guidance=5.0, progress=False))
    out = tmp_path / "gen"
    result = CliRunner().invoke(app, ["generate", "a red star", "--model", str(sd3_folder), "-n", "2", "--steps", "3",
                                      "--guidance", "5", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [r["scheduler"] for r in records] == ["FlowMatchEulerDiscreteScheduler"] * 2
    assert (records[0]["height"], records[0]["width"]) == (32, 32)

"""DDIM inversion: inverting then regenerating with the same model gives the image back."""

import copy

import numpy as np
import pytest
import torch

from erasekit.attacks.ddim_inversion import ddim_invert, ddim_inversion_inputs, encode_images, invert_images
from erasekit.attacks.images import render_concept_images
from erasekit.errors import ErasekitError
from erasekit.generation import generate, image_size
from erasekit.toy.pipeline import weights_available

STEPS = 20


def _unit_latent_pipeline(pipe, images):
    """``pipe`` with its own VAE copy whose scaling factor gives unit-variance latents, as a trained VAE's does
    (a random VAE's latents are ~0.03 after SD's factor, tiny next to the noise, which makes inversion
    meaningless). The UNet stays random."""
    from diffusers import StableDiffusionPipeline

    parts = dict(pipe.components)
    parts["vae"] = copy.deepcopy(pipe.vae)
    out = StableDiffusionPipeline(**parts)
    out.set_progress_bar_config(disable=True)
    raw = encode_images(out, images) / out.vae.config.scaling_factor
    out.vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
    return out


def _vae_round_trip(pipe, latents):
    with torch.no_grad():
        x = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((x.clamp(-1, 1) + 1) / 2 * 255).round().permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("which", ["toy_random", "tiny_sd1"])
def test_inversion_then_regeneration_reconstructs(which, request):
    base = request.getfixturevalue(which)
    images = render_concept_images("star", 2, image_size(base)[0])[0]
    pipe = _unit_latent_pipeline(base, images)
    z0 = encode_images(pipe, images)
    target = _vae_round_trip(pipe, z0)  # the best any latent method can do through this VAE
    errors = {}
    for refine in (0, 8):
        noise, budget = invert_images(pipe, images, steps=STEPS, refine=refine, progress=False)
        assert noise.shape == z0.shape and budget["unet_evaluations"] == 2 * STEPS * (1 + refine)
        # Regenerate with the empty prompt at the default guidance: CFG of "" with "" is exact.
        out = generate(pipe, "", [0, 1], steps=STEPS, latents=noise, progress=False)
        errors[refine] = np.abs(out.astype(float) - target).mean()
    # Measured at 20 steps (random UNets, which are no denoisers): plain DDIM inversion about 23 levels of 255
    # mean error; with 8 fixed-point refinements per step 0.03 (toy). The trained world: see the next test.
    assert errors[8] < 1.0, errors
    assert errors[8] < errors[0]


@pytest.mark.skipif(not weights_available(), reason="needs the trained embedded world")
def test_plain_inversion_on_the_trained_world_reconstructs():
    from erasekit.toy.detector import load_toy_detector, top_labels
    from erasekit.toy.pipeline import build_toy_pipeline

    pipe = build_toy_pipeline()
    images, truth = render_concept_images("star", 16, image_size(pipe)[0], seed=123)
    noise, _ = invert_images(pipe, images, progress=False)
    out = generate(pipe, "", list(range(16)), latents=noise, progress=False)
    assert np.abs(out.astype(float) - images.astype(float)).mean() < 20
    labels = top_labels(load_toy_detector().predict(out))
    assert sum(lab["shape"] == "star" for lab in labels) >= 14


def test_guided_inversion_under_a_prompt_runs(toy_random):
    images = render_concept_images("star", 2, 32)[0]
    z0 = encode_images(toy_random, images)
    a = ddim_invert(toy_random, z0, prompt="a star", steps=3, guidance=3.0, progress=False)
    b = ddim_invert(toy_random, z0, prompt="a star", steps=3, guidance=1.0, progress=False)
    c = ddim_invert(toy_random, z0, prompt="", steps=3, guidance=3.0, progress=False)  # "" with "": one pass
    assert a.shape == z0.shape and not torch.allclose(a, b)
    torch.testing.assert_close(c, ddim_invert(toy_random, z0, steps=3, progress=False))
    _, budget = invert_images(toy_random, images, prompt="a star", steps=3, guidance=3.0, progress=False)
    assert budget["unet_evaluations"] == 2 * 3 * 2 and budget["inversion_prompt"] == "a star"
    assert budget["images_per_s"] > 0


def test_batches_do_not_change_the_result(toy_random):
    z0 = encode_images(toy_random, render_concept_images("star", 3, 32)[0])
    together = ddim_invert(toy_random, z0, steps=3, batch_size=3, progress=False)
    apart = ddim_invert(toy_random, z0, steps=3, batch_size=1, progress=False)
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-5)


def test_bad_inputs(toy_random):
    with pytest.raises(ErasekitError, match="resize them first"):
        encode_images(toy_random, np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ErasekitError, match="uint8 RGB"):
        encode_images(toy_random, np.zeros((1, 32, 32), np.uint8))
    with pytest.raises(ErasekitError, match="steps >= 1"):
        ddim_invert(toy_random, torch.zeros(1, 4, 8, 8), steps=-1)
    with pytest.raises(ErasekitError, match="no inverted latents"):
        ddim_inversion_inputs(torch.zeros(0, 4, 8, 8), "")


def test_inputs_record_each_latent():
    lat = torch.randn(3, 4, 8, 8)
    inputs = ddim_inversion_inputs(lat, "", seeds=[5, 6, 7], items=[{"source": f"s{i}"} for i in range(3)],
                                   budget={"inversion_steps": 20})
    ids = inputs.input_ids()
    assert len(set(ids)) == 3 and all(i.startswith("latent:") for i in ids)
    assert inputs.budget == {"inversion_steps": 20, "regenerate_prompt": ""}

"""Probes (Lu et al.) on SD3 and FLUX.1: every probe as a scenario on the tiny flow pipelines, and the behaviour of
each probe type through the family's sampler, flow-matching schedule and VAE (FLUX: packed 2x2 latents)."""

import numpy as np
import pytest
import torch
from PIL import Image

from erasekit.attacks.scenarios import ScenarioConfig, run_scenario
from erasekit.diffusion import Target

PROBE_SCENARIOS = ["probe-inpainting", "probe-completion", "probe-noise", "probe-classifier-guidance",
                   "probe-interference"]
TINY = {"noise": {"etas": "1.0,1.5", "variance_scales": "1.0"},
        "interference": {"prompts": "cat=a photo of a cat;dog=a photo of a dog"}}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow_pipe(request):
    from erasekit.models.tiny_flow import tiny_flux_pipeline, tiny_sd3_pipeline

    return {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[request.param]()


@pytest.fixture(scope="module")
def erased(flow_pipe):
    from erasekit.erasers import erase

    return Target(flow_pipe).with_edits(erase(flow_pipe, "uce", "star", progress=False))


def _detector(concept="star"):
    from erasekit.detectors.toy import ToyConceptDetector
    from erasekit.toy.detector import ToyDetector

    torch.manual_seed(0)
    return ToyConceptDetector(concept, model=ToyDetector().eval())


def _sources(n=2):
    from erasekit.attacks.images import render_concept_images

    return render_concept_images("star", n, 32, seed=5)[0]


@pytest.mark.parametrize("scenario", PROBE_SCENARIOS)
def test_every_probe_runs_on_flow_families_and_returns_its_record(erased, scenario, tmp_path):
    folder = None
    if scenario == "probe-inpainting":
        folder = tmp_path / "images"
        folder.mkdir()
        for i, img in enumerate(_sources()):
            Image.fromarray(img).save(folder / f"{i}.png")
    cfg = ScenarioConfig(scenario, "star", n=2, steps=2, settings=TINY)
    s = run_scenario(cfg, erased, _detector(), tmp_path / "out", images_folder=folder, progress=False)
    assert s["n"] == 2 and 0 <= s["crr"] <= 1
    assert s["attack"]["name"] == cfg.attack().name and "optimisation_steps" in s["attack"]
    if scenario == "probe-noise":
        assert s["attack"]["samples_per_image"] == 2
    again = run_scenario(cfg, erased, _detector(), tmp_path / "out", images_folder=folder, progress=False)
    assert again["generation"]["images_generated"] == 0 and again["crr"] == s["crr"]


def test_completion_k0_is_the_erased_model_and_k_all_the_original(erased):
    from erasekit.generation import generate
    from erasekit.probes.completion import completion_images

    prompts, seeds, steps = ["a red star", "a star"], [3, 4], 3
    edited = generate(erased, prompts, seeds, steps=steps, guidance=4.0, progress=False)
    original = generate(erased.original(), prompts, seeds, steps=steps, guidance=4.0, progress=False)
    assert not np.array_equal(edited, original)  # the edit changes the images
    k0 = completion_images(erased, prompts, seeds, steps=steps, scale=4.0, k=0)
    kall = completion_images(erased, prompts, seeds, steps=steps, scale=4.0, k=steps)
    mid = completion_images(erased, prompts, seeds, steps=steps, scale=4.0, k=1)
    assert np.abs(k0.astype(int) - edited.astype(int)).max() <= 1
    assert np.abs(kall.astype(int) - original.astype(int)).max() <= 1
    assert not np.array_equal(mid, edited) and not np.array_equal(mid, original)


def test_inpainting_keeps_the_unmasked_region_and_redraws_the_centre(erased):
    from erasekit.probes.inpainting import inpaint, resolve_mask

    sources = _sources()
    mask = resolve_mask(erased.pipe, None)
    out = inpaint(erased, sources, ["a star"] * 2, [0, 1], steps=3, scale=4.0, pixel_mask=mask)
    assert out.shape == sources.shape and np.array_equal(out[:, ~mask], sources[:, ~mask])
    assert not np.array_equal(out[:, mask], sources[:, mask])


def test_inpainting_blend_is_the_flow_forward_process(flow_pipe):
    """With zero noise the known region at each step is (1 - s) z0, s the step's sigma (flow matching)."""
    from erasekit.diffusion.sampler import Sampler
    from erasekit.diffusion.vae import encode_images
    from erasekit.probes.inpainting import InpaintBlend, resolve_mask
    from erasekit.probes.sampling import latent_mask, sample

    z0 = encode_images(flow_pipe, _sources())
    m = latent_mask(resolve_mask(flow_pipe, 8), flow_pipe.vae_scale_factor)
    seen = []

    class Spy:
        def before(self, state):
            seen.append((state.t, state.latents.clone()))

    sample(Target(flow_pipe), ["a star"] * 2, [0, 1], steps=3, scale=4.0, decode=False,
           hooks=[InpaintBlend(flow_pipe, z0, m, torch.zeros_like(z0)), Spy()])
    sigmas = Sampler(flow_pipe, 3).scheduler.sigmas
    assert len(seen) == 3
    for (t, lat), s in zip(seen, sigmas):
        assert float(t) == pytest.approx(float(s) * 1000, rel=1e-5)
        keep = (m == 0).expand_as(lat)
        assert torch.allclose(lat[keep], ((1 - s) * z0)[keep], atol=1e-5)


def test_stochastic_flow_step_at_eta_zero_is_the_euler_sampler(flow_pipe):
    from erasekit.diffusion.sampler import Sampler
    from erasekit.probes.noise import StochasticFlow, stochastic_step
    from erasekit.probes.sampling import sample

    target = Target(flow_pipe)
    sched = Sampler(flow_pipe, 3).scheduler
    assert isinstance(stochastic_step(flow_pipe, sched, 1.0, 1.0, [9]), StochasticFlow)
    plain = sample(target, ["a star"], [1], steps=3, scale=4.0, decode=False)
    hooked = sample(target, ["a star"], [1], steps=3, scale=4.0, decode=False,
                    hooks=[StochasticFlow(sched, 0.0, 1.0, [9])])
    assert torch.allclose(plain, hooked, atol=1e-5)
    noisy = sample(target, ["a star"], [1], steps=3, scale=4.0, decode=False,
                   hooks=[StochasticFlow(sched, 1.85, 1.04, [9])])
    assert torch.isfinite(noisy).all() and not torch.allclose(plain, noisy)  # eta > 1: no NaN


def test_stochastic_flow_noise_is_the_ddpm_posterior_at_eta_one():
    """eta = 1 injects the std of q(x_s' | x_s, x0) of the forward chain x = (1 - s) x0 + s eps: re-typed
    from the chain's Gaussian posterior, sigma' sqrt(1 - (alpha sigma' / (alpha' sigma))^2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from erasekit.diffusion.sampler import StepState
    from erasekit.probes.noise import StochasticFlow

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(4)
    x0, xt = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    hook = StochasticFlow(sched, 1.0, 1.0, [0])
    state = StepState(1, 4, sched.timesteps[1], xt, x0=x0)
    hook.after(state)
    z = torch.randn(1, 2, 2, generator=torch.Generator().manual_seed(0))
    s, s2 = float(sched.sigmas[1]), float(sched.sigmas[2])
    a, a2 = 1 - s, 1 - s2
    var = s2 ** 2 * (1 - (a * s2 / (a2 * s)) ** 2)  # Var[x_s' | x_s, x0] of the forward chain
    assert torch.allclose(state.next_latents[0], var ** 0.5 * z, atol=1e-6)


def test_classifier_guidance_sees_the_vaes_images_and_moves_the_sample(flow_pipe):
    """The gradient is taken on decode(x0) exactly as the pipeline decodes (the SD3 / FLUX VAE's shift too)."""
    from erasekit.diffusion.vae import decode_latents
    from erasekit.probes.classifier_guidance import ClassifierGuidanceHook
    from erasekit.probes.sampling import sample

    seen = []

    def log_prob(images):
        seen.append(images.detach())
        return images.mean(dim=(1, 2, 3))

    kept = []

    class Keep:  # before the guidance hook: the x0 it decodes
        def after(self, state):
            kept.append(state.x0.clone())

    target = Target(flow_pipe)
    hook = ClassifierGuidanceHook(flow_pipe, log_prob, 2.0, 1.0)
    guided = sample(target, ["a star"], [1], steps=3, scale=4.0, hooks=[Keep(), hook])
    assert hook.evaluations == 3
    ref = decode_latents(flow_pipe, kept[0]).astype(np.float32) / 255
    assert np.abs(seen[0][0].permute(1, 2, 0).numpy() - ref[0]).max() <= 1 / 255 + 1e-4
    plain = sample(target, ["a star"], [1], steps=3, scale=4.0)
    assert guided.astype(float).mean() > plain.astype(float).mean()  # pushed up the (brightness) log-prob


def test_likelihood_is_the_flow_matching_loss(flow_pipe):
    """Same model twice: ratio 1; the loss is || v(x_s) - (eps - x0) ||^2 at x_s = (1 - s) x0 + s eps, re-typed."""
    from erasekit.diffusion.family import family_of
    from erasekit.diffusion.guidance import UNetDenoiser
    from erasekit.diffusion.vae import encode_images
    from erasekit.probes.verdict import denoising_losses, likelihood_gap

    images = _sources()
    target = Target(flow_pipe)
    o = denoising_losses(target, images, ["a star"] * 2, timesteps=(100, 600), seed=3)
    e = denoising_losses(target, images, ["a star"] * 2, timesteps=(100, 600), seed=3)
    assert o["cond"] != o["uncond"]
    gap = likelihood_gap(e, o, o, o)
    assert gap["uncond"]["ratio_concept"] == 1.0 and gap["cond"]["gap"] == 0.0
    family = family_of(flow_pipe)
    z0 = encode_images(flow_pipe, images)
    gen = torch.Generator("cpu").manual_seed(3)
    noise = {t: torch.randn(z0.shape, generator=gen) for t in (100, 600)}
    s = 0.6
    x = (1 - s) * z0 + s * noise[600]
    with torch.no_grad():
        cond = family.encode(flow_pipe, ["a star"] * 2)
        pred = UNetDenoiser(family.denoiser(flow_pipe), family)(x, torch.full((2,), 600), cond)
    assert o["cond"][600] == pytest.approx(float((pred - (noise[600] - z0)).pow(2).mean()), rel=1e-5)

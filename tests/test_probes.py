"""Probes (Lu et al.): each one end to end as a scenario on the embedded world and the tiny SD-1/SD-2 pipelines;
diffusion completion's two ends, inpainting's kept region, the verdict, and bad input."""

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from erasekit.attacks.scenarios import ScenarioConfig, run_scenario, scenario_names, split_settings
from erasekit.diffusion import Target
from erasekit.errors import ErasekitError

PROBE_SCENARIOS = ["probe-inpainting", "probe-completion", "probe-noise", "probe-classifier-guidance",
                   "probe-interference"]
TINY = {"noise": {"etas": "1.0,1.5", "variance_scales": "1.0"}}


def _detector(concept="star"):
    from erasekit.detectors.toy import ToyConceptDetector
    from erasekit.toy.detector import ToyDetector

    torch.manual_seed(0)
    return ToyConceptDetector(concept, model=ToyDetector().eval())


@pytest.fixture(scope="module")
def uce_toy(toy_random):
    """The random toy with a UCE edit of "star" (an erased model to compare with the original)."""
    from erasekit.erasers import erase

    edit = erase(toy_random, "uce", ["star"], progress=False)
    return Target(toy_random, model="toy").with_edits(edit)


def _images_folder(pipe, tmp_path, n=2):
    from erasekit.diffusion.vae import image_size

    h, w = image_size(pipe)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_every_probe_is_a_scenario_and_listed():
    from erasekit.registry import PROBES

    assert set(PROBE_SCENARIOS) <= set(scenario_names())
    assert set(PROBES.names()) == {"inpainting", "completion", "noise", "classifier_guidance", "interference"}
    out = CliRunner().invoke(__import__("erasekit.cli", fromlist=["app"]).app, ["ls"]).stdout
    for s in PROBE_SCENARIOS:
        assert f"  {s} " in out
    assert "--scenario probe-completion" in out


@pytest.mark.parametrize("scenario", PROBE_SCENARIOS)
def test_probe_end_to_end_on_the_embedded_world(toy_random, uce_toy, scenario, tmp_path):
    cfg = ScenarioConfig(scenario, "star", n=2, steps=3, settings=TINY)
    s = run_scenario(cfg, uce_toy, _detector(), tmp_path / "out", progress=False)
    assert s["n"] == 2 and 0 <= s["crr"] <= 1
    assert s["attack"]["name"] == cfg.attack().name and "optimisation_steps" in s["attack"]
    again = run_scenario(cfg, uce_toy, _detector(), tmp_path / "out", progress=False)  # cached: nothing new
    assert again["generation"]["images_generated"] == 0 and again["crr"] == s["crr"]


@pytest.mark.parametrize("pipe_name", ["tiny_sd1", "tiny_sd2", "tiny_sd2_v", "tiny_sdxl"])
@pytest.mark.parametrize("scenario", PROBE_SCENARIOS)
def test_tiny_sd_pipelines_run_every_probe(pipe_name, scenario, request, tmp_path):
    pipe = request.getfixturevalue(pipe_name)
    settings = dict(TINY, interference={"prompts": "cat=a photo of a cat;dog=a photo of a dog"})
    cfg = ScenarioConfig(scenario, "star", n=2, steps=2, settings=settings)
    folder = _images_folder(pipe, tmp_path) if scenario == "probe-inpainting" else None
    s = run_scenario(cfg, Target(pipe, model=pipe_name), _detector(), tmp_path / "out", images_folder=folder,
                     progress=False)
    assert s["n"] == 2


def test_completion_k0_is_the_erased_model_and_k_all_the_original(uce_toy):
    from erasekit.generation import generate
    from erasekit.probes.completion import completion_images

    prompts, seeds, steps = ["a red star", "a star on a dotted background"], [3, 4], 4
    erased = generate(uce_toy, prompts, seeds, steps=steps, guidance=5.0, progress=False)
    original = generate(uce_toy.original(), prompts, seeds, steps=steps, guidance=5.0, progress=False)
    assert np.abs(erased.astype(int) - original.astype(int)).max() > 5  # the edit changes the images
    k0 = completion_images(uce_toy, prompts, seeds, steps=steps, scale=5.0, k=0)
    kall = completion_images(uce_toy, prompts, seeds, steps=steps, scale=5.0, k=steps)
    assert np.abs(k0.astype(int) - erased.astype(int)).max() <= 1
    assert np.abs(kall.astype(int) - original.astype(int)).max() <= 1
    assert not uce_toy.pipe.__dict__.get("_erasekit_applied_edits")  # weights restored


def test_inpainting_keeps_the_unmasked_region(uce_toy):
    from erasekit.attacks.images import render_concept_images
    from erasekit.probes.inpainting import inpaint, resolve_mask

    sources, _ = render_concept_images("star", 2, 32, seed=5)
    mask = resolve_mask(uce_toy.pipe, 12)
    assert mask.sum() == 144 and mask[16, 16] and not mask[0, 0]
    out = inpaint(uce_toy, sources, ["a star", "a star"], [0, 1], steps=3, scale=5.0, pixel_mask=mask)
    assert out.shape == sources.shape
    assert np.array_equal(out[:, ~mask], sources[:, ~mask])
    assert not np.array_equal(out[:, mask], sources[:, mask])  # the centre is redrawn


def test_inpainting_blend_keeps_known_latents(toy_random):
    """Without pasting, the final latents outside the mask are the source's exactly (the hook's blend)."""
    from erasekit.diffusion.vae import encode_images
    from erasekit.probes.inpainting import InpaintBlend, resolve_mask
    from erasekit.probes.sampling import latent_mask, sample

    from erasekit.attacks.images import render_concept_images

    target = Target(toy_random, model="toy")
    sources, _ = render_concept_images("star", 2, 32, seed=5)
    z0 = encode_images(toy_random, sources)
    m = latent_mask(resolve_mask(toy_random, 8), toy_random.vae_scale_factor)
    seen = []

    class Spy:
        def before(self, state):
            seen.append(state.latents.clone())

    sample(target, ["a star"] * 2, [0, 1], steps=3, scale=5.0, hooks=[InpaintBlend(toy_random, z0, m, torch.zeros_like(z0)), Spy()],
           decode=False)
    # With zero noise the known region at every step is sqrt(a_t) * z0.
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(toy_random.scheduler.config)
    sched.set_timesteps(3)
    for lat, t in zip(seen, sched.timesteps):
        expect = sched.alphas_cumprod[t].sqrt() * z0
        keep = (m == 0).expand_as(lat)
        assert torch.allclose(lat[keep], expect[keep], atol=1e-5)


def test_noise_probe_takes_the_best_of_the_grid(toy_random, tmp_path):
    s = run_scenario(ScenarioConfig("probe-noise", "star", n=2, steps=2,
                                     settings={"noise": {"etas": "1.0,1.85", "variance_scales": "1.0,1.04"}}),
                     Target(toy_random, model="toy"), _detector(), tmp_path, progress=False)
    assert s["attack"]["samples_per_image"] == 4


def test_stochastic_ddim_with_eta_zero_is_ddim(toy_random):
    from erasekit.diffusion.sampler import Sampler
    from erasekit.probes.noise import StochasticDDIM
    from erasekit.probes.sampling import sample

    target = Target(toy_random, model="toy")
    plain = sample(target, ["a star"], [1], steps=3, scale=5.0, decode=False)
    hooked = sample(target, ["a star"], [1], steps=3, scale=5.0, decode=False,
                    hooks=[StochasticDDIM(Sampler(toy_random, 3).scheduler, 0.0, 1.0, [9])])
    assert torch.allclose(plain, hooked, atol=1e-5)
    noisy = sample(target, ["a star"], [1], steps=3, scale=5.0, decode=False,
                   hooks=[StochasticDDIM(Sampler(toy_random, 3).scheduler, 1.85, 1.04, [9])])
    assert torch.isfinite(noisy).all() and not torch.allclose(plain, noisy)  # eta > 1: no NaN


def test_likelihood_and_verdict(toy_random, uce_toy):
    from erasekit.attacks.images import render_concept_images
    from erasekit.probes.verdict import denoising_losses, likelihood_gap, verdict

    images, _ = render_concept_images("star", 4, 32, seed=1)
    o = denoising_losses(Target(toy_random), images, ["a star"] * 4, timesteps=(100, 600))
    e = denoising_losses(uce_toy, images, ["a star"] * 4, timesteps=(100, 600))
    assert set(o) == {"cond", "uncond"} and set(o["cond"]) == {100, 600}
    assert e["uncond"] == pytest.approx(o["uncond"], rel=0.05)  # UCE barely touches the empty prompt
    gap = likelihood_gap(e, o, o, o)
    assert abs(gap["uncond"]["gap"]) < 0.05
    assert verdict({"a": 0.9, "b": 0.1}, gap)[0] == "avoidance"
    lowered = {"uncond": {"gap": 0.5}, "cond": {"gap": 0.5}}
    assert verdict({"a": 0.05}, lowered)[0] == "destruction"
    assert verdict({"a": 0.05}, gap)[0] == "mixed"


def test_likelihood_on_sdxl(tiny_sdxl):
    """SDXL: the UNet gets the pooled embedding and time ids; the same model twice gives ratio 1, gap 0."""
    from erasekit.attacks.images import render_concept_images
    from erasekit.probes.verdict import denoising_losses, likelihood_gap

    images, _ = render_concept_images("star", 2, 32, seed=1)
    o = denoising_losses(Target(tiny_sdxl), images, ["a star"] * 2, timesteps=(100, 600))
    e = denoising_losses(Target(tiny_sdxl), images, ["a star"] * 2, timesteps=(100, 600))
    assert all(np.isfinite(v) and v > 0 for branch in o.values() for v in branch.values())
    assert o["cond"] != o["uncond"]  # the prompt reaches the UNet (SDXL's unconditional branch is zeros)
    gap = likelihood_gap(e, o, o, o)
    assert gap["uncond"]["ratio_concept"] == 1.0 and gap["cond"]["ratio_concept"] == 1.0
    assert gap["uncond"]["gap"] == 0.0


# -- bad input ----------------------------------------------------------------------------------------------
def test_unknown_probe_setting_is_one_clear_error():
    with pytest.raises(ErasekitError, match="unknown setting 'bogus'"):
        split_settings({"completion.bogus": "1"})
    with pytest.raises(ErasekitError, match="must be one of"):
        split_settings({"inpainting.prompt_mode": "loud"})
    with pytest.raises(ErasekitError, match="not a number"):
        ScenarioConfig("probe-noise", "star", settings={"noise": {"etas": "1.0,abc"}}).validate()


def test_k_out_of_range(toy_random, tmp_path):
    with pytest.raises(ErasekitError, match="k=9 is out of range"):
        run_scenario(ScenarioConfig("probe-completion", "star", n=1, steps=4, settings={"completion": {"k": 9}}),
                     Target(toy_random), _detector(), tmp_path, progress=False)
    with pytest.raises(ErasekitError, match="completion: k must be"):
        ScenarioConfig("probe-completion", "star", settings={"completion": {"k": -1}}).validate()


def test_mask_larger_than_the_image(toy_random, tmp_path):
    with pytest.raises(ErasekitError, match=r"the mask \(40x40 px\) is larger than the 32x32 image"):
        run_scenario(ScenarioConfig("probe-inpainting", "star", n=1, steps=2, settings={"inpainting": {"mask_size": 40}}),
                     Target(toy_random), _detector(), tmp_path, progress=False)


def test_classifier_guidance_needs_a_differentiable_detector(toy_random, tmp_path):
    class Opaque:
        name = "opaque"

        def info(self):
            return {"name": "opaque", "threshold": 0.5}

    from erasekit.probes.classifier_guidance import log_prob_fn

    with pytest.raises(ErasekitError, match="differentiable"):
        log_prob_fn(Opaque())


@pytest.mark.parametrize("args, fragment", [
    (["--set", "completion.bogus=1"], "unknown setting 'bogus'"),
    (["--set", "completion.k=-2"], "completion: k must be"),
    (["--set", "inpainting.mask_size=0"], "mask_size must be at least 1"),
])
def test_cli_bad_probe_input_exits_2_with_one_line(args, fragment, tmp_path):
    from erasekit.cli import app

    scenario = "probe-inpainting" if "inpainting" in args[1] else "probe-completion"
    result = CliRunner().invoke(app, ["attack", "--scenario", scenario, "--concept", "star", "--out",
                                      str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.skipif(not __import__("erasekit.toy.pipeline", fromlist=["x"]).weights_available(),
                    reason="trained toy weights not installed")
def test_cli_k_out_of_range_on_the_trained_world(tmp_path):
    from erasekit.cli import app

    result = CliRunner().invoke(app, ["attack", "--scenario", "probe-completion", "--concept", "star", "-n", "1",
                                      "--steps", "4", "--set", "completion.k=5", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "k=5 is out of range" in result.stderr, result.output


@pytest.mark.parametrize("pipe_name", ["tiny_sd1", "tiny_sdxl"])
def test_probe_sampling_equals_generation(pipe_name, request):
    """The probes' sampler builds conditioning, the unconditional branch (zeros for SDXL-base's empty prompt) and
    guidance exactly as generation does: the same images for the same seeds."""
    from erasekit.generation import generate
    from erasekit.probes.sampling import sample

    pipe = request.getfixturevalue(pipe_name)
    ours = sample(Target(pipe), ["a star", "a cat"], [0, 1], steps=2, scale=5.0)
    ref = generate(pipe, ["a star", "a cat"], [0, 1], steps=2, guidance=5.0, progress=False)
    assert np.array_equal(ours, ref)

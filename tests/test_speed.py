"""The fast path (channels-last + compiled UNet, batch padding) gives the eager path's images, and SD-2.x
v-prediction flows through every method and attack.

Tolerance: on the CPU in float32, compiled and eager images differ by at most 1 uint8 level at any pixel (kernel
rounding). On an H100 in fp16 (not testable here) scripts/bench_gpu.py measured at most 3 levels, mean 0.14
(benchmarks/gpu_h100_sd14_b64.json; SDXL: 2, benchmarks/gpu_h100_sdxl.json).
"""

import sys

import numpy as np
import pytest
import torch


def test_fast_generation_equals_eager_and_compiles_once(tiny_sd1):
    from erasekit.diffusion.speed import SpeedOptions, accelerate
    from erasekit.generation import generate
    from erasekit.models.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd1")  # channels-last is applied in place: not the shared fixture
    seeds = list(range(5))
    eager = generate(pipe, "a red star", seeds, steps=3, batch_size=4, progress=False)
    # aot_eager: dynamo tracing + AOT autograd, the graph the inductor compiles, in seconds on a CPU
    fast_unet = accelerate(pipe, SpeedOptions(backend="aot_eager"))
    fast = generate(pipe, "a red star", seeds, steps=3, batch_size=4, progress=False, fast=True)
    assert np.abs(eager.astype(int) - fast).max() <= 1
    # 4 + 1 images: the last batch is padded to the compiled shape (8 UNet rows), no second shape
    assert {size for _, size in fast_unet.batch_sizes} == {8}
    assert {size for _, size in fast_unet.decoder.batch_sizes} == {4}  # the VAE decoder too, padded the same way
    assert fast_unet.unet is pipe.unet and accelerate(pipe) is fast_unet
    reference = generate(tiny_sd1, "a red star", seeds, steps=3, batch_size=4, progress=False)
    assert np.abs(reference.astype(int) - eager).max() <= 1


def test_fast_path_sees_weight_edits_without_recompiling():
    from erasekit.diffusion.speed import SpeedOptions, accelerate
    from erasekit.erasers.concept import ConceptSpec
    from erasekit.erasers.uce import UCE, UCESettings
    from erasekit.generation import generate
    from erasekit.models.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd1")
    accelerate(pipe, SpeedOptions(backend="aot_eager"))
    before = generate(pipe, "a star", [0, 1], steps=2, progress=False, fast=True)
    result = UCE().compute(pipe, ConceptSpec(concepts=("star",), guide="", preserve=()), UCESettings(erase_scale=50.0),
                           progress=False)
    from erasekit.erasers.base import _parameter

    saved = {n: _parameter(pipe, n).detach().clone() for n in result.tensors}
    try:
        with torch.no_grad():
            for n, w in result.tensors.items():
                _parameter(pipe, n).copy_(w)
        edited_fast = generate(pipe, "a star", [0, 1], steps=2, progress=False, fast=True)
        edited_eager = generate(pipe, "a star", [0, 1], steps=2, progress=False)
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                _parameter(pipe, n).copy_(w)
    assert np.abs(edited_fast.astype(int) - edited_eager).max() <= 1
    assert np.abs(edited_fast.astype(int) - before).max() > 0


@pytest.mark.slow
def test_inductor_compiled_unet_equals_eager(tiny_sd1):
    """The real thing (inductor code generation; about a minute on a 2-core CPU)."""
    from erasekit.diffusion.speed import SpeedOptions, accelerate
    from erasekit.generation import generate
    from erasekit.models.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd1")
    eager = generate(pipe, "a red star", [0, 1], steps=2, progress=False)
    accelerate(pipe, SpeedOptions())
    fast = generate(pipe, "a red star", [0, 1], steps=2, progress=False, fast=True)
    assert np.abs(eager.astype(int) - fast).max() <= 1


def test_fast_images_are_recorded_and_cached_apart(tmp_path):
    """generate_to_dir(fast=True) (what `erasekit generate --fast` and bench `fast: true` run): the records say fast,
    their keys differ from the eager images' (rounding differs), a rerun reuses them, the images stay within 1 level;
    batch_size="auto" is the default batch on the CPU."""
    from erasekit.diffusion.speed import SpeedOptions, accelerate
    from erasekit.generation import GenerationInputs, generate_to_dir
    from erasekit.image_store import record_key
    from erasekit.models.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd1")
    inputs = GenerationInputs(["a red star"] * 3, [0, 1, 2])
    eager, made = generate_to_dir(pipe, inputs, tmp_path, steps=2, batch_size=2, progress=False)
    assert made == 3 and not any(r.get("fast") for r in eager)
    accelerate(pipe, SpeedOptions(backend="aot_eager"))  # what fast=True would compile, in seconds on a CPU
    fast, made = generate_to_dir(pipe, inputs, tmp_path, steps=2, batch_size="auto", progress=False, fast=True)
    assert made == 3 and all(r["fast"] is True for r in fast)
    assert {record_key(r) for r in fast}.isdisjoint(record_key(r) for r in eager)
    assert record_key(dict(eager[0], fast=False)) == record_key(eager[0])  # eager keys as before the option existed
    again, made = generate_to_dir(pipe, inputs, tmp_path, steps=2, batch_size=3, progress=False, fast=True)
    assert made == 0 and [r["key"] for r in again] == [r["key"] for r in fast]
    from PIL import Image

    for e, f in zip(eager, fast):
        a = np.asarray(Image.open(tmp_path / e["path"]), dtype=int)
        b = np.asarray(Image.open(tmp_path / f["path"]), dtype=int)
        assert np.abs(a - b).max() <= 1


def test_train_autocast_is_off_on_cpu(tiny_sd1):
    from erasekit.diffusion.family import family_of
    from erasekit.diffusion.speed import auto_batch_size, train_autocast

    with train_autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    assert auto_batch_size(tiny_sd1, family_of(tiny_sd1), 32, 32) == 32  # the CPU: the default


def test_v_prediction_images_equal_diffusers(tiny_sd2_v):
    from erasekit.generation import generate, initial_latents

    pipe = tiny_sd2_v
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    lat = initial_latents(pipe, [0, 1])
    ref = pipe(prompt=["a star"] * 2, latents=lat.clone(), num_inference_steps=3, guidance_scale=7.5,
               output_type="np").images
    ref = (np.clip(ref, 0, 1) * 255).round().astype(np.uint8)
    ours = generate(pipe, "a star", [0, 1], steps=3, guidance=7.5, progress=False)
    assert np.abs(ref.astype(int) - ours).max() <= 1


def test_v_prediction_through_erasers_and_attacks(tiny_sd2_v, monkeypatch):
    """ESD's targets are guidance in the UNet's own output (linear in v as in eps); textual inversion's loss target is
    the velocity for v-prediction models; DDIM inversion steps with the scheduler's prediction type."""
    import diffusers

    from erasekit.attacks.ddim_inversion import ddim_invert
    from erasekit.attacks.textual_inversion import TextualInversionConfig, learn_textual_inversion
    from erasekit.erasers.concept import ConceptSpec
    from erasekit.erasers.esd import ESDSettings, ESDu, ESDx
    from erasekit.erasers.rece import RECE, RECESettings
    from erasekit.erasers.uce import UCE, UCESettings

    pipe = tiny_sd2_v
    spec = ConceptSpec(concepts=("star",), guide="", preserve=())
    for method, s in ((UCE(), UCESettings()), (RECE(), RECESettings()),
                      (ESDx(), ESDSettings(iterations=2, batch_size=1, ddim_steps=2, trajectories=1)),
                      (ESDu(), ESDSettings(iterations=2, batch_size=1, ddim_steps=2, trajectories=1))):
        assert method.compute(pipe, spec, s, progress=False).tensors
    calls = []
    original = diffusers.DDPMScheduler.get_velocity

    def spy(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(diffusers.DDPMScheduler, "get_velocity", spy)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    learn_textual_inversion(pipe, images, TextualInversionConfig(token="<v-ti>", steps=2, batch_size=2), progress=False)
    assert len(calls) == 2  # the v target, every step
    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    zT = ddim_invert(pipe, z0, steps=4, progress=False)
    from diffusers import DDIMInverseScheduler

    inv = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    assert inv.config.prediction_type == "v_prediction" and torch.isfinite(zT).all()


def test_the_timestep_is_copied_to_the_device_once_per_value():
    """A host-to-device copy per UNet call would wait for the GPU every step: each timestep value is copied once."""
    from erasekit.diffusion.guidance import UNetDenoiser

    d = UNetDenoiser(unet=None)
    meta = torch.device("meta")
    a = d._timestep(torch.tensor(981), meta)
    assert a.device == meta and d._timestep(torch.tensor(981), meta) is a
    assert d._timestep(torch.tensor(961), meta) is not a and d._timestep(961, meta) is not a
    cpu_t = torch.tensor(5)
    assert d._timestep(cpu_t, torch.device("cpu")) is cpu_t  # nothing to copy on the CPU


def test_textual_inversion_loop_does_not_read_the_loss_every_step(tiny_sd1, monkeypatch):
    """On a GPU each `.item()` waits for the queued work; the loop reads its losses once, at the end (same values).
    `to_device` is a plain copy off CUDA."""
    from erasekit.attacks.textual_inversion import TextualInversionConfig, learn_textual_inversion
    from erasekit.diffusion.transfer import to_device

    x = torch.arange(6.0)
    assert to_device(x, "cpu") is x or torch.equal(to_device(x, "cpu"), x)
    calls = []
    item = torch.Tensor.item

    def counting(self):
        if "erasekit" in sys._getframe(1).f_code.co_filename:  # ours (Adam reads its host-side step counter)
            calls.append(1)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    learned = learn_textual_inversion(tiny_sd1, images, TextualInversionConfig(token="<sync>", steps=12, batch_size=2),
                                      progress=False)
    assert len(calls) < 12 and np.isfinite(learned.budget["loss_last"])

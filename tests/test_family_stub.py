"""A new model family is one class: register it, and sampling, inversion, the K/V edits and attention capture
follow its denoiser call, schedule and attention sites with no other change."""

import pytest
import torch

from erasekit.diffusion.family import FAMILIES, SDFamily, family_of, register_family


class CountingFamily(SDFamily):
    """A stub family for tiny SD-1 pipelines tagged ``_stub_family``: counts its denoiser calls and offers only
    the up-block attention sites."""

    name = "stub"

    def __init__(self):
        self.calls = 0

    def matches(self, pipe) -> bool:
        return bool(getattr(pipe, "_stub_family", False))

    def denoise(self, model, x, t, cond):
        self.calls += 1
        return super().denoise(model, x, t, cond)

    def attention_sites(self, pipe):
        return [s for s in super().attention_sites(pipe) if s.name.startswith("unet.up.")]


@pytest.fixture
def stub_family():
    family = CountingFamily()
    register_family(family)
    try:
        yield family
    finally:
        FAMILIES.remove(family)


@pytest.fixture
def stub_pipe():
    from erasekit.models.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("sd1")
    pipe._stub_family = True
    return pipe


def test_the_registered_family_owns_the_pipeline(stub_family, stub_pipe):
    from erasekit.attacks.ddim_inversion import invert_images
    from erasekit.erasers import erase
    from erasekit.generation import generate

    assert family_of(stub_pipe) is stub_family
    images = generate(stub_pipe, ["a star"] * 2, [0, 1], steps=3, guidance=5.0, progress=False)
    assert stub_family.calls == 3  # one batched (uncond + cond) call per step, through the family
    invert_images(stub_pipe, images, steps=3, progress=False)
    assert stub_family.calls == 6
    edit = erase(stub_pipe, "uce", "star", settings={"tokens": "last"}, progress=False)
    assert edit.tensors and all(".up_blocks." in name for name in edit.tensors)  # only the family's sites


def test_registering_the_same_family_twice_is_refused(stub_family):
    with pytest.raises(ValueError, match="already registered"):
        register_family(CountingFamily())


def test_unknown_pipelines_are_refused_by_the_one_detection_function():
    from erasekit.errors import ErasekitError

    with pytest.raises(ErasekitError, match="not a pipeline of a supported model family"):
        family_of(torch.nn.Linear(1, 1))

"""Outputs pinned by digest: every path that calls a model (sampling, inversion, a defence's hooks, ESD's and textual
inversion's training losses, a closed-form edit) on the embedded world and tiny SD-1, SD-2 (v-prediction) and SDXL
pipelines, and a checkpoint folder whose scheduler is not DDIM.

The digests in tests/data/digests.json were made before the model-family refactor (issue 19) and must not move
when code is only reorganised: a change that alters any pixel or training value fails here. A change that means to
alter outputs regenerates them (``ERASEKIT_WRITE_DIGESTS=1 pytest tests/test_digests.py``) and says why in its
commit. Digests are of uint8 images and of float32 values rounded to 6 significant digits (training) on the CPU
build of torch the project pins.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

DIGESTS = Path(__file__).parent / "data" / "digests.json"
WRITE = os.environ.get("ERASEKIT_WRITE_DIGESTS") == "1"
SEEDS = [0, 1]


def _digest(array) -> str:
    a = np.ascontiguousarray(np.asarray(array))
    return hashlib.sha256(a.tobytes() + str(a.shape).encode() + str(a.dtype).encode()).hexdigest()[:24]


def _values_digest(values) -> str:
    return _digest(np.array([float(f"{float(v):.6g}") for v in values], dtype=np.float64))


@pytest.fixture(scope="module")
def recorded():
    data = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
    yield data
    if WRITE:
        DIGESTS.parent.mkdir(exist_ok=True)
        DIGESTS.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")


def _check(recorded, name: str, value: str) -> None:
    if WRITE:
        recorded[name] = value
        return
    assert name in recorded, f"no digest recorded for {name}: run with ERASEKIT_WRITE_DIGESTS=1"
    assert value == recorded[name], f"{name}: outputs changed ({value} != {recorded[name]})"


@pytest.fixture(scope="module")
def toy():
    from erasekit.models import load_pipeline

    return load_pipeline("toy")


def _pipes(request, name):
    return request.getfixturevalue({"toy": "toy", "sd1": "tiny_sd1", "sd2v": "tiny_sd2_v", "sdxl": "tiny_sdxl"}[name])


PROMPTS = {"toy": ["a red star on a striped background", "a blue circle"], "sd1": ["a star", "a heart"]}


@pytest.mark.parametrize("name", ["toy", "sd1", "sd2v", "sdxl"])
def test_generation_and_inversion_digests(request, recorded, name):
    from erasekit.attacks.ddim_inversion import invert_images
    from erasekit.generation import generate

    pipe = _pipes(request, name)
    prompts = PROMPTS.get(name, PROMPTS["sd1"])
    steps = 6 if name == "toy" else 4
    images = generate(pipe, prompts, SEEDS, steps=steps, progress=False)
    _check(recorded, f"{name}/generate", _digest(images))
    latents, _ = invert_images(pipe, images, steps=steps, progress=False)
    _check(recorded, f"{name}/inverted", _digest(latents.float().numpy().round(4)))
    again = generate(pipe, "", SEEDS, steps=steps, latents=latents, progress=False)
    _check(recorded, f"{name}/regenerated", _digest(again))
    eta = generate(pipe, prompts, SEEDS, steps=steps, eta=1.0, progress=False)
    _check(recorded, f"{name}/eta1", _digest(eta))


@pytest.mark.parametrize("name", ["toy", "sd1", "sd2v", "sdxl"])
def test_defence_digests(request, recorded, name):
    from erasekit.defences import parse_defence
    from erasekit.diffusion import Target
    from erasekit.generation import generate

    pipe = _pipes(request, name)
    prompts = PROMPTS.get(name, PROMPTS["sd1"])
    for spec in ["irece:concept=star,stop=1", "sld:concept=star,preset=max", "negative_prompt:text=star",
                 "dual_reconstruction:concept=star,threshold=0"]:
        target = Target(pipe).with_defences(parse_defence(spec))
        images = generate(target, prompts, SEEDS, steps=4, progress=False)
        _check(recorded, f"{name}/{spec.split(':')[0]}", _digest(images))


@pytest.mark.parametrize("name", ["sd1", "sd2v", "sdxl"])
def test_training_digests(request, recorded, name):
    """ESD's loss trajectory, the learned token and a closed-form edit: eps/v/x0 conversions and K/V site order."""
    from erasekit.attacks.textual_inversion import TextualInversionConfig, learn_textual_inversion
    from erasekit.erasers import erase
    from erasekit.generation import generate

    pipe = _pipes(request, name)
    esd = erase(pipe, "esd-x", "star", settings={"iterations": 3, "ddim_steps": 3, "trajectories": 1,
                                                  "batch_size": 1, "lr": 1e-3}, progress=False)
    _check(recorded, f"{name}/esd-x", _values_digest([esd.extra["loss_first"], esd.extra["loss_last"]]
                                                     + [t.double().sum().item() for _, t in sorted(esd.tensors.items())]))
    images = generate(pipe, PROMPTS["sd1"], SEEDS, steps=3, progress=False)
    ti = learn_textual_inversion(pipe, images, TextualInversionConfig(steps=3, batch_size=2, images=2), progress=False)
    vectors = [ti.vectors] + ([ti.vectors_2] if ti.vectors_2 is not None else [])
    _check(recorded, f"{name}/textual-inversion", _values_digest(torch.cat([v.flatten() for v in vectors])))
    uce = erase(pipe, "uce", "star", settings={"tokens": "last"}, progress=False)
    _check(recorded, f"{name}/uce", _values_digest([t.double().sum().item() for _, t in sorted(uce.tensors.items())]))


def test_checkpoint_folder_with_another_scheduler(recorded, tiny_sd1, tmp_path):
    """A folder saved with an Euler scheduler: what erasekit samples with today (its DDIM default) is pinned."""
    from diffusers import EulerDiscreteScheduler

    from erasekit.generation import generate
    from erasekit.models import load_pipeline

    tiny_sd1.save_pretrained(tmp_path / "sd1")
    EulerDiscreteScheduler.from_config(tiny_sd1.scheduler.config).save_pretrained(tmp_path / "sd1" / "scheduler")
    pipe = load_pipeline(str(tmp_path / "sd1"))
    images = generate(pipe, PROMPTS["sd1"], SEEDS, steps=4, progress=False)
    _check(recorded, "sd1-folder-euler/generate", _digest(images))


def test_fingerprints_are_pinned(recorded, toy, tiny_sd1, tmp_path):
    """Fingerprints key every cached image and edit: a folder with another scheduler keeps the key it had when
    loading swapped DDIM in (the scheduler erasekit samples with is what is hashed)."""
    from diffusers import EulerDiscreteScheduler

    from erasekit.models import fingerprint, load_pipeline

    tiny_sd1.save_pretrained(tmp_path / "sd1")
    EulerDiscreteScheduler.from_config(tiny_sd1.scheduler.config).save_pretrained(tmp_path / "sd1" / "scheduler")
    for name, pipe in [("toy", toy), ("sd1", tiny_sd1), ("sd1-folder-euler", load_pipeline(str(tmp_path / "sd1")))]:
        _check(recorded, f"{name}/fingerprint", fingerprint(pipe))

"""The embedded world: renderer, detector, trained pipeline (prompt following, round trip), loading errors."""

import numpy as np
import pytest
import torch

from erasekit.toy import architecture as arch
from erasekit.toy import world
from erasekit.toy.render import render_batch, render_seed

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def toy():
    from erasekit.toy.pipeline import weights_available

    if not weights_available():  # the weights are committed: their absence is a broken checkout, not a skip
        pytest.fail("the embedded world's trained weights are missing from src/erasekit/toy/weights")
    from erasekit.models import load_pipeline

    return load_pipeline("toy")


@pytest.fixture(scope="module")
def detector():
    from erasekit.toy.detector import load_toy_detector

    return load_toy_detector()


def test_renderer_is_deterministic_per_seed():
    a, scenes_a = render_batch(range(100, 110), arch.IMAGE_SIZE)
    b, scenes_b = render_batch([105, 100], arch.IMAGE_SIZE)
    assert a.shape == (10, arch.IMAGE_SIZE, arch.IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a[5], b[0]) and np.array_equal(a[0], b[1])
    assert scenes_a[5] == scenes_b[0]
    assert not np.array_equal(a[0], a[1])


def test_renderer_covers_the_world_and_empty_scenes():
    _, scenes = render_batch(range(600), arch.IMAGE_SIZE)
    assert {s.shape for s in scenes} == set(world.SHAPE_LABELS)
    assert {s.texture for s in scenes} == set(world.TEXTURES)
    assert {s.color for s in scenes if s.shape != world.NONE} == set(world.COLORS)
    assert 0.03 < np.mean([s.shape == world.NONE for s in scenes]) < 0.2


def test_render_given_scene_draws_that_scene():
    scene = world.Scene(shape="star", color="red", texture="checkered")
    img, got = render_seed(3, arch.IMAGE_SIZE, scene=scene)
    assert got == scene and img.shape == (arch.IMAGE_SIZE, arch.IMAGE_SIZE, 3)


def test_detector_accuracy_on_held_out_renders(detector):
    from erasekit.toy.detector import top_labels

    images, scenes = render_batch(range(30_000_000, 30_000_300), arch.IMAGE_SIZE)
    pred = top_labels(detector.predict(images))
    truth = [s.as_dict() for s in scenes]
    shape = np.mean([p["shape"] == t["shape"] for p, t in zip(pred, truth)])
    texture = np.mean([p["texture"] == t["texture"] for p, t in zip(pred, truth)])
    color = np.mean([p["color"] == t["color"] for p, t in zip(pred, truth) if t["shape"] != world.NONE])
    assert shape >= 0.98 and color >= 0.98 and texture >= 0.98, (shape, color, texture)


def test_detector_probabilities_are_distributions(detector):
    images, _ = render_batch(range(5), arch.IMAGE_SIZE)
    probs = detector.predict(images)
    assert set(probs) == {"shape", "color", "texture"}
    for name, labels in (("shape", world.SHAPE_LABELS), ("color", world.COLORS), ("texture", world.TEXTURES)):
        p = probs[name]
        assert p.shape == (5, len(labels))
        torch.testing.assert_close(p.sum(-1), torch.ones(5))


def test_prompt_following_on_a_small_sample(toy, detector):
    """One image per (shape, texture) pair with a rotating colour: 24 prompts, bars a little below the issue's."""
    from erasekit.generation import generate
    from erasekit.toy.detector import top_labels

    combos = [(world.COLORS[i % len(world.COLORS)], s, t)
              for i, (s, t) in enumerate((s, t) for s in world.SHAPES for t in world.TEXTURES)]
    prompts = [world.canonical_prompt(s, c, t) for c, s, t in combos]
    images = generate(toy, prompts, range(4_000_000, 4_000_000 + len(prompts)), batch_size=24, progress=False)
    pred = top_labels(detector.predict(images))
    shape = np.mean([p["shape"] == s for p, (_, s, _) in zip(pred, combos)])
    color = np.mean([p["color"] == c for p, (c, _, _) in zip(pred, combos)])
    texture = np.mean([p["texture"] == t for p, (_, _, t) in zip(pred, combos)])
    assert shape >= 0.9 and color >= 0.9 and texture >= 0.85, (shape, color, texture)


def test_toy_is_a_standard_ddim_pipeline(toy):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    assert isinstance(toy, StableDiffusionPipeline) and isinstance(toy.scheduler, DDIMScheduler)
    assert toy.unet.config.cross_attention_dim == arch.TEXT_DIM


def test_toy_save_load_round_trip(toy, tmp_path):
    from erasekit.generation import generate
    from erasekit.models import fingerprint, load_pipeline

    toy.save_pretrained(tmp_path / "toy")
    first = load_pipeline(str(tmp_path / "toy"))
    second = load_pipeline(str(tmp_path / "toy"))
    # no randomly initialised pooler on load: the fingerprint is the same from load to load
    assert fingerprint(first) == fingerprint(second)
    prompts, seeds = ["a red star on a plain background", "an empty striped background"], [1, 2]
    a = generate(toy, prompts, seeds, steps=5, progress=False)
    b = generate(first, prompts, seeds, steps=5, progress=False)
    assert np.array_equal(a, b)


def test_missing_and_corrupt_toy_weights(tmp_path):
    import shutil

    from erasekit.errors import ErasekitError
    from erasekit.toy.pipeline import WEIGHTS_DIR, build_toy_pipeline

    with pytest.raises(ErasekitError, match="missing"):
        build_toy_pipeline(tmp_path)
    shutil.copytree(WEIGHTS_DIR, tmp_path / "w")
    (tmp_path / "w" / "unet.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ErasekitError, match="unet"):
        build_toy_pipeline(tmp_path / "w")


@pytest.mark.parametrize("kind", ["shape", "texture"])
def test_erasure_templates_are_valid_contexts(kind):
    from erasekit.erasers.uce import parse_templates
    from erasekit.toy import world

    contexts = world.erasure_templates(kind, 16)
    assert parse_templates(";".join(contexts)) == contexts  # one "{c}" each, no duplicates
    assert len(contexts) == 16 + (3 if kind == "shape" else 4)
    filled = [t.format(c="star" if kind == "shape" else "checkered") for t in contexts]
    assert all(len(f.split()) <= 10 for f in filled)
    with pytest.raises(ValueError):
        world.erasure_templates("color", 4)

"""Worlds hold every world-specific choice, and a `Target` is handed its world (issue #19)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from erasekit.worlds import SD_WORLD, SDXL_WORLD, TOY_WORLD, WORLDS, world_named, world_of


def test_a_target_uses_the_world_it_is_given(tiny_sd1):
    from erasekit.diffusion import Target, as_target

    given = Target(tiny_sd1, world=TOY_WORLD)  # not what detection would say: the given world wins
    assert given.world is TOY_WORLD
    assert given.with_defences().original().without_defences().world is TOY_WORLD  # shared by derived targets
    assert as_target(tiny_sd1, world=SDXL_WORLD).world is SDXL_WORLD
    assert Target(tiny_sd1).world is world_of(tiny_sd1) is SD_WORLD  # a bare pipeline: found from the pipeline


def test_world_named_knows_the_embedded_world_before_loading():
    assert world_named("toy") is TOY_WORLD
    assert world_named("runwayml/stable-diffusion-v1-5") is None and world_named("./folder") is None


def test_default_pairs_and_styles():
    pairs = SD_WORLD.concept_pairs("van gogh", 7)
    assert len(pairs) == 7 and all("van gogh" in w and "van gogh" not in wo for w, wo in pairs)
    assert SD_WORLD.is_style("van gogh style") and not SD_WORLD.is_style("nudity")
    assert TOY_WORLD.is_style("checkered") and not TOY_WORLD.is_style("star") and not TOY_WORLD.is_style("red")
    pairs = TOY_WORLD.concept_pairs("red", 5, seed=3)
    assert pairs == TOY_WORLD.concept_pairs("red", 5, seed=3)
    assert all("red" in w.split() and "red" not in wo.split() for w, wo in pairs)


def test_toy_detector_loaded_by_its_world():
    det = TOY_WORLD.detector("star")
    assert det.name == "toy" and det._model is not None  # its weights loaded now: a run fails before generating
    assert TOY_WORLD.detector("star", "toy", threshold=0.7).threshold == 0.7


def test_label_scores_only_for_a_worlds_own_detector():
    from PIL import Image

    from erasekit.worlds.toy import render_concept_images

    images, _ = render_concept_images("star", 2, 64, seed=4)  # resized to the world's 32 px by the world
    rows = TOY_WORLD.label_scores("toy", [Image.fromarray(a) for a in images], batch_size=8)
    assert len(rows) == 2 and set(rows[0]) == {"shape", "color", "texture"}
    for row in rows:
        assert max(row["shape"], key=row["shape"].get) == "star"
        assert all(sum(probs.values()) == pytest.approx(1.0, abs=2e-3) for probs in row.values())
    assert TOY_WORLD.label_scores("nudenet", [Image.fromarray(images[0])], 8) is None
    assert all(w.label_scores("toy", [], 8) is None for w in WORLDS if w is not TOY_WORLD)


def test_toy_frechet_features_are_the_detectors_features():
    """The world's Fréchet features equal the toy feature extractor's (same net, same resizing)."""
    from erasekit.metrics.features import ToyExtractor

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    module = TOY_WORLD.frechet_features()
    assert module.num_features == 96
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        ours = module(x).flatten(1)
        theirs = ToyExtractor().features(images)
    assert ours.shape == (3, 96) and torch.allclose(ours, theirs, atol=1e-6)
    assert SD_WORLD.frechet_features() is None

"""Textual inversion: learns only the new vectors, saves in diffusers' format, loads into fresh pipelines."""

import copy

import numpy as np
import pytest
import torch

from erasekit.attacks.images import render_concept_images
from erasekit.attacks.textual_inversion import (
    LEARNED_EMBEDS_FILE, LearnedEmbedding, TextualInversionConfig, learn_textual_inversion, textual_inversion_inputs,
)
from erasekit.errors import ErasekitError
from erasekit.generation import image_size
from erasekit.models import encode_prompts, fingerprint

TINY = dict(steps=4, batch_size=4)


def _fresh_text_side(pipe):
    """A pipeline sharing the UNet/VAE but with its own tokenizer and text encoder (what TI loading changes)."""
    from diffusers import StableDiffusionPipeline

    parts = dict(pipe.components)
    parts["tokenizer"] = copy.deepcopy(pipe.tokenizer)
    parts["text_encoder"] = copy.deepcopy(pipe.text_encoder)
    fresh = StableDiffusionPipeline(**parts)
    fresh.set_progress_bar_config(disable=True)
    return fresh


def _concept_images(pipe, n=4):
    return render_concept_images("star", n, image_size(pipe)[0])[0]


@pytest.mark.parametrize("which", ["tiny_sd1", "toy_random"])
@pytest.mark.parametrize("num_vectors", [1, 2])
def test_learned_embedding_loads_with_load_textual_inversion(which, num_vectors, request, tmp_path):
    pipe = request.getfixturevalue(which)
    before = fingerprint(pipe)
    cfg = TextualInversionConfig(token="<star-ti>", num_vectors=num_vectors, **TINY)
    learned = learn_textual_inversion(pipe, _concept_images(pipe), cfg, progress=False)
    assert fingerprint(pipe) == before  # nothing of the pipeline changed, no token added
    assert len(pipe.tokenizer) == len(_fresh_text_side(pipe).tokenizer)
    assert learned.vectors.shape == (num_vectors, pipe.text_encoder.get_input_embeddings().embedding_dim)
    init = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer("object", add_special_tokens=False).input_ids].mean(0)
    assert (learned.vectors - init).abs().max() > 0  # the vectors were trained
    b = learned.budget
    assert b["optimisation_steps"] == 4 and b["batch_size"] == 4 and b["images_used"] == 4
    assert b["wall_s"] > 0 and b["seconds_per_token"] == b["wall_s"] and "loss_last" in b

    path = learned.save(tmp_path)
    assert path.name == LEARNED_EMBEDS_FILE and (tmp_path / "textual_inversion.json").is_file()
    fresh = _fresh_text_side(pipe)
    fresh.load_textual_inversion(str(path))
    prompts = ["a picture of a <star-ti>", "a <star-ti> on a striped background", "a star"]
    torch.testing.assert_close(encode_prompts(fresh, prompts), learned.encode(pipe, prompts), rtol=0, atol=0)
    again = LearnedEmbedding.load(tmp_path)
    assert again.token == "<star-ti>" and again.digest() == learned.digest() and again.budget == learned.budget


def test_learning_is_deterministic_and_only_moves_new_rows(toy_random):
    images = _concept_images(toy_random)
    cfg = TextualInversionConfig(token="<a-ti>", **TINY)
    table = toy_random.text_encoder.get_input_embeddings().weight.detach().clone()
    flags = [p.requires_grad for p in toy_random.unet.parameters()]
    a = learn_textual_inversion(toy_random, images, cfg, progress=False)
    b = learn_textual_inversion(toy_random, images, cfg, progress=False)
    torch.testing.assert_close(a.vectors, b.vectors, rtol=0, atol=0)
    assert torch.equal(toy_random.text_encoder.get_input_embeddings().weight, table)
    assert flags == [p.requires_grad for p in toy_random.unet.parameters()]  # requires_grad restored


def test_inputs_use_the_token(toy_random):
    learned = LearnedEmbedding("<star-ti>", torch.zeros(1, 384))
    inputs = textual_inversion_inputs(learned, 3, seed=10, learned_on="original")
    assert inputs.prompts == ["a picture of a <star-ti>"] * 3 and inputs.seeds == [10, 11, 12]
    assert inputs.budget["learned_on"] == "original" and inputs.learned is learned
    ids = inputs.input_ids()
    assert len(set(ids)) == 1 and ids[0].startswith("ti:")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(token="<Star>"), "lower-case"),
        (dict(token="two words"), "one word"),
        (dict(token="star"), "already in the tokenizer"),
        (dict(steps=0), "steps must be at least 1"),
        (dict(lr=0.0), "lr must be positive"),
        (dict(templates=("no slot",)), "needs a '{}'"),
        (dict(initializer="   "), "gives no tokens"),
    ],
)
def test_bad_settings(toy_random, kwargs, fragment):
    cfg = TextualInversionConfig(**{"token": "<x-ti>", **TINY, **kwargs})
    with pytest.raises(ErasekitError, match=fragment):
        learn_textual_inversion(toy_random, _concept_images(toy_random), cfg, progress=False)


def test_bad_images(toy_random):
    cfg = TextualInversionConfig(token="<x-ti>", **TINY)
    with pytest.raises(ErasekitError, match="resize them first"):
        learn_textual_inversion(toy_random, np.zeros((2, 16, 16, 3), np.uint8), cfg, progress=False)
    with pytest.raises(ErasekitError, match="uint8 RGB"):
        learn_textual_inversion(toy_random, np.zeros((2, 32, 32, 3), np.float32), cfg, progress=False)


def test_embedding_from_another_text_encoder_is_refused(toy_random):
    learned = LearnedEmbedding("<star-ti>", torch.zeros(1, 768))
    with pytest.raises(ErasekitError, match="another text encoder"):
        learned.encode(toy_random, ["a <star-ti>"])

"""Pipeline loading, cross-attention discovery, prompt encoding and fingerprints on tiny pipelines."""

import numpy as np
import pytest
import torch

from erasekit.errors import ErasekitError
from erasekit.generation import generate
from erasekit.models import (
    cross_attention_kv,
    cross_attention_modules,
    encode_prompts,
    end_positions,
    fingerprint,
    load_pipeline,
    text_width,
    tokenize,
    word_token_positions,
)
from erasekit.models.tiny import SD14_UNET_CONFIG, tiny_clip_tokenizer

WIDTHS = {"sd1": 768, "sd2": 1024, "toy": 384}


@pytest.fixture(scope="module")
def saved_sd1(tiny_sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1") / "pipe"
    tiny_sd1.save_pretrained(folder)
    return folder


def _width_of(pipe):
    return {768: "sd1", 1024: "sd2", 384: "toy"}[pipe.unet.config.cross_attention_dim]


def test_cross_attention_layers_and_widths(any_pipe):
    kind = _width_of(any_pipe)
    mods = cross_attention_modules(any_pipe.unet)
    kv = cross_attention_kv(any_pipe.unet)
    assert text_width(any_pipe.unet) == WIDTHS[kind]
    assert len(mods) >= 2 and len(kv) == 2 * len(mods)
    assert [n for n, _ in kv[:2]] == [mods[0][0] + ".to_k", mods[0][0] + ".to_v"]
    assert all(isinstance(layer, torch.nn.Linear) and layer.in_features == WIDTHS[kind] for _, layer in kv)
    names = dict(any_pipe.unet.named_modules())
    assert all(names[n] is layer for n, layer in kv)
    assert not any("attn1" in n for n, _ in kv)


def test_sd14_unet_has_16_cross_attention_layers():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the real architecture, no memory
        unet = UNet2DConditionModel(**SD14_UNET_CONFIG)
    kv = cross_attention_kv(unet)
    assert len(cross_attention_modules(unet)) == 16 and len(kv) == 32
    assert {layer.in_features for _, layer in kv} == {768} and text_width(unet) == 768


@pytest.mark.slow
def test_sd14_shaped_pipeline_generates():
    """The full-size SD-1.4-shaped random pipeline (for GPU benchmarks) works end to end; ~4 GB of memory."""
    from erasekit.models.tiny import sd14_shaped_pipeline

    pipe = sd14_shaped_pipeline(text_layers=1)
    assert len(cross_attention_modules(pipe.unet)) == 16 and pipe.vae_scale_factor == 8
    images = generate(pipe, ["a red star"], [0], steps=1, height=128, width=128, progress=False)
    assert images.shape == (1, 128, 128, 3)


def test_encode_prompts_matches_diffusers(any_pipe):
    prompts = ["a red star on a striped background", "a starfish"]
    ours = encode_prompts(any_pipe, prompts)
    theirs, _ = any_pipe.encode_prompt(prompts, torch.device("cpu"), 1, False)
    assert ours.shape == (2, any_pipe.tokenizer.model_max_length, WIDTHS[_width_of(any_pipe)])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert tokenize(any_pipe, "a starfish").shape == (1, any_pipe.tokenizer.model_max_length)


def test_word_and_end_positions_clip(tiny_sd1, tiny_sd2):
    for pipe in (tiny_sd1, tiny_sd2):
        ids = tokenize(pipe, "a red star")[0].tolist()
        words = word_token_positions(pipe, "a red star")
        assert words == [1, 2, 3]  # the tiny vocabulary has whole-word tokens for these
        assert [pipe.tokenizer.convert_ids_to_tokens(ids[i]) for i in words] == ["a</w>", "red</w>", "star</w>"]
        ends = end_positions(pipe, "a red star")
        assert ends[0] == 4 and ids[4] == pipe.tokenizer.eos_token_id and ends[-1] == 76
    # SD-2 pads with "!", an ordinary token: it must not count as a word.
    assert tiny_sd2.tokenizer.pad_token == "!" and word_token_positions(tiny_sd2, "a red star") == [1, 2, 3]


def test_word_and_end_positions_bert(toy_random):
    tok = toy_random.tokenizer
    words = word_token_positions(toy_random, "a starfish on a dotted background")
    ids = tokenize(toy_random, "a starfish on a dotted background")[0].tolist()
    assert ids[0] == tok.cls_token_id and words[0] == 1
    assert tok.convert_ids_to_tokens([ids[i] for i in words])[:2] == ["a", "star"]
    ends = end_positions(toy_random, "a starfish on a dotted background")
    assert ids[ends[0]] == tok.sep_token_id and ends[0] == words[-1] + 1 and ends[-1] == tok.model_max_length - 1


def test_positions_of_truncated_prompt(toy_random):
    long = " ".join(["red"] * 100)
    words = word_token_positions(toy_random, long)
    assert words == list(range(1, toy_random.tokenizer.model_max_length - 1))
    assert end_positions(toy_random, long) == [toy_random.tokenizer.model_max_length - 1]


def test_tiny_tokenizer_words_are_single_tokens():
    tok = tiny_clip_tokenizer()
    assert tok.tokenize("a red starfish on a striped background") == [
        "a</w>", "red</w>", "starfish</w>", "on</w>", "a</w>", "striped</w>", "background</w>"]
    assert len(tok.tokenize("zebra")) == 5  # unknown words are spelled out


def test_save_load_round_trip_gives_identical_images(tiny_sd1, saved_sd1):
    loaded = load_pipeline(str(saved_sd1))
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert fingerprint(loaded) == fingerprint(tiny_sd1)
    kwargs = dict(steps=3, guidance=7.5, progress=False)
    a = generate(tiny_sd1, ["a red star"] * 2, [0, 1], **kwargs)
    b = generate(loaded, ["a red star"] * 2, [0, 1], **kwargs)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_fingerprint_stable_and_sensitive(tiny_sd2):
    import copy
    from types import SimpleNamespace

    before = fingerprint(tiny_sd2)
    assert before == fingerprint(tiny_sd2) and len(before) == 16
    unet = copy.deepcopy(tiny_sd2.unet)
    _, layer = cross_attention_kv(unet)[0]
    with torch.no_grad():
        layer.weight[0, 0] += 1e-3  # an in-place edit, as closed-form erasers do
    edited = SimpleNamespace(**{**tiny_sd2.components, "unet": unet})
    assert fingerprint(edited) != before
    assert fingerprint(tiny_sd2) == before


def test_fingerprint_toy_is_fast(toy_random):
    import time

    t = time.perf_counter()
    fp = fingerprint(toy_random)
    assert time.perf_counter() - t < 5.0  # ~0.1 s when the CPU is free
    assert fp == fingerprint(toy_random)


def test_load_errors(tmp_path, saved_sd1):
    with pytest.raises(ErasekitError, match="no model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ErasekitError, match="cannot load model 'nobody/no-such-model'"):
        load_pipeline("nobody/no-such-model")
    with pytest.raises(ErasekitError, match="no such folder"):
        load_pipeline(str(tmp_path / "absent"))
    with pytest.raises(ErasekitError, match="empty model spec"):
        load_pipeline("  ")


def _copy_pipeline(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_load_missing_and_corrupt_weights(tmp_path, saved_sd1):
    broken = _copy_pipeline(saved_sd1, tmp_path / "missing")
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.unlink()
    with pytest.raises(ErasekitError, match="missing weight file in .*unet"):
        load_pipeline(str(broken))

    corrupt = _copy_pipeline(saved_sd1, tmp_path / "corrupt")
    weights = next((corrupt / "vae").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ErasekitError, match=f"corrupt weight file .*{weights.name}"):
        load_pipeline(str(corrupt))

    truncated = _copy_pipeline(saved_sd1, tmp_path / "truncated")
    weights = next((truncated / "text_encoder").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ErasekitError, match="corrupt weight file .*text_encoder"):
        load_pipeline(str(truncated))

"""Textual inversion on SD3 and FLUX.1: a token in every text encoder the family uses (T5 included), learned on the
flow-matching loss; its file, its conditioning against diffusers' own pipeline with the token loaded, the loss
re-typed from diffusers' SD3 / FLUX DreamBooth scripts, and the attack on a tiny erased model."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from erasekit.attacks.textual_inversion import (
    LEARNED_EMBEDS_FILE, LearnedEmbedding, TextualInversionConfig, learn_textual_inversion, learn_textual_inversions,
)
from erasekit.attacks.textual_inversion_loop import token_loss
from erasekit.diffusion import Target
from erasekit.diffusion.family import family_of
from erasekit.models import fingerprint

ENCODERS = {"sd3": ("clip_l", "clip_g", "t5"), "flux": ("clip_l", "t5")}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow_pipe(request):
    from erasekit.models.tiny_flow import tiny_flux_pipeline, tiny_sd3_pipeline

    return {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[request.param]()


def _name(pipe) -> str:
    return family_of(pipe).name


def _random_images(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _loaded_like_diffusers(pipe, learned):
    """A copy of ``pipe`` whose tokenizers know the token and whose encoders' tables hold its rows (what
    ``load_textual_inversion`` does per encoder), for diffusers' own ``encode_prompt``."""
    fresh = copy.deepcopy(pipe)
    for (_, tok, enc), vectors in zip(family_of(fresh).encoders(fresh), learned.per_encoder()):
        tok.add_tokens(learned.tokens)
        enc.resize_token_embeddings(len(tok))
        ids = tok.convert_tokens_to_ids(learned.tokens)
        with torch.no_grad():
            enc.get_input_embeddings().weight[ids] = vectors
    return fresh


def _diffusers_encode(pipe, prompt):
    """(states, pooled) of diffusers' own encode_prompt, T5 at the length erasekit's family uses."""
    n = family_of(pipe).t5_tokens(pipe) if _name(pipe) == "sd3" else family_of(pipe).t5_length(pipe, pipe.tokenizer_2, 512)
    with torch.no_grad():
        if _name(pipe) == "sd3":
            states, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False,
                                                      max_sequence_length=n)
        else:
            states, pooled, _ = pipe.encode_prompt(prompt, prompt, max_sequence_length=n)
    return states, pooled


def test_a_token_in_every_encoder_saved_loaded_and_encoded_as_diffusers_does(flow_pipe, tmp_path):
    from safetensors.torch import load_file

    before = fingerprint(flow_pipe)
    learned = learn_textual_inversion(flow_pipe, _random_images(), TextualInversionConfig(
        token="<x-ti>", steps=3, batch_size=2, lr=0.05), progress=False)
    assert fingerprint(flow_pipe) == before  # nothing of the pipeline changed, no token added anywhere
    encoders = family_of(flow_pipe).encoders(flow_pipe)
    assert learned.encoders == ENCODERS[_name(flow_pipe)] == tuple(n for n, _, _ in encoders)
    for (_, tok, enc), v in zip(encoders, learned.per_encoder()):
        assert v.shape == (1, enc.get_input_embeddings().embedding_dim)
        init = enc.get_input_embeddings().weight[tok("object", add_special_tokens=False).input_ids].mean(0)
        assert (v - init).abs().max() > 1e-3  # every encoder's vector trained, T5's too
    assert "<x-ti>" not in flow_pipe.tokenizer.get_vocab()

    learned.save(tmp_path)
    assert set(load_file(str(tmp_path / LEARNED_EMBEDS_FILE))) == set(ENCODERS[_name(flow_pipe)])
    again = LearnedEmbedding.load(tmp_path)
    assert again.token == "<x-ti>" and again.digest() == learned.digest() and again.encoders == learned.encoders

    prompt = "a picture of a <x-ti>"
    cond = again.encode(flow_pipe, [prompt])
    states, pooled = _diffusers_encode(_loaded_like_diffusers(flow_pipe, again), [prompt])
    torch.testing.assert_close(cond.states, states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.added["pooled"], pooled, rtol=1e-5, atol=1e-5)
    # The T5 part of the conditioning sees the token: it differs from the same prompt with another word there.
    plain = family_of(flow_pipe).encode(flow_pipe, ["a picture of a object"])
    t5_part = slice(-states.shape[1] + (77 if _name(flow_pipe) == "sd3" else 0), None)
    assert (cond.states[:, t5_part] - plain.states[:, t5_part]).abs().max() > 1e-4


def test_the_first_step_is_the_reference_flow_matching_loss(flow_pipe):
    """Re-typed from diffusers' train_dreambooth_lora_{sd3,flux} (weighting_scheme none): index u * 1000 into the
    training scheduler's timesteps, sigma from its sigmas, x = (1 - sigma) z + sigma noise with z = (sample - shift) *
    scale, the transformer's velocity against noise - z (FLUX: packed latents, timestep / 1000, guidance 3.5), mean
    squared error; the conditioning from diffusers' encode_prompt with the token's starting rows loaded."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from erasekit.attacks.textual_inversion_embedding import _initial_vectors

    images, bs, seed = _random_images(3, seed=4), 2, 7
    cfg = TextualInversionConfig(token="<r-ti>", steps=1, batch_size=bs, seed=seed, templates=("a photo of a {}",))
    losses: list = []
    learn_textual_inversions(flow_pipe, [(images, cfg)], progress=False, trajectories=losses)

    pipe = flow_pipe
    family = family_of(pipe)
    start = LearnedEmbedding.from_parts("<r-ti>", [_initial_vectors(pipe, "object", 1, tok, enc)
                                                   for _, tok, enc in family.encoders(pipe)],
                                        [n for n, _, _ in family.encoders(pipe)])
    states, pooled = _diffusers_encode(_loaded_like_diffusers(pipe, start), ["a photo of a <r-ti>"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        dist = pipe.vae.encode(x).latent_dist
        idx = torch.randint(len(images), (bs,), generator=gen)
        sample = dist.mean[idx] + dist.std[idx] * torch.randn(dist.mean[idx].shape, generator=gen)
        z = (sample - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        noise = torch.randn(z.shape, generator=gen)
        indices = torch.randint(1000, (bs,), generator=gen)  # (u * num_train_timesteps).long(), u uniform
        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        timesteps, sigmas = sched.timesteps[indices], sched.sigmas[indices].reshape(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * z + sigmas * noise
        states, pooled = states.expand(bs, -1, -1), pooled.expand(bs, -1)
        if _name(pipe) == "sd3":
            pred = pipe.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=states,
                                    pooled_projections=pooled, return_dict=False)[0]
        else:
            b, c, h, w = z.shape
            packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
            ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, z.device, z.dtype)
            pred = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000,
                                    guidance=torch.tensor([3.5]).expand(b), pooled_projections=pooled,
                                    encoder_hidden_states=states, txt_ids=torch.zeros(states.shape[1], 3),
                                    img_ids=ids, return_dict=False)[0]
            pred = FluxPipeline._unpack_latents(pred, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                                pipe.vae_scale_factor)
        want = torch.mean(((pred.float() - (noise - z).float()) ** 2).reshape(bs, -1), 1).mean()
    assert losses[0][0] == pytest.approx(float(want), rel=1e-5)


def test_tokens_learned_together_on_a_flow_model_equal_one_at_a_time(flow_pipe):
    jobs = [(_random_images(3, seed=1), TextualInversionConfig(token="<a-ti>", steps=3, batch_size=2, seed=0)),
            (_random_images(4, seed=2), TextualInversionConfig(token="<b-ti>", steps=2, batch_size=3, seed=1))]
    losses: list = []
    together = learn_textual_inversions(flow_pipe, jobs, progress=False, trajectories=losses)
    for (images, cfg), got, traj in zip(jobs, together, losses):
        alone: list = []
        want, = learn_textual_inversions(flow_pipe, [(images, cfg)], progress=False, trajectories=alone)
        for a, b in zip(got.per_encoder(), want.per_encoder()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        np.testing.assert_allclose(traj, alone[0], rtol=1e-5)


def test_the_attack_brings_the_concept_back_on_an_erased_flow_model(flow_pipe, tmp_path):
    """White-box on a UCE-erased tiny model: the token learned from the concept's images (the original model's
    "a red star") makes those images more likely on the erased model (a lower flow-matching loss at fixed draws)
    than the concept's own prompt does there, and than the original model's prompt does on the original: the
    erasure is undone for the images the attacker holds. Measured: token 1.5513 / 1.5797, the prompt on the erased
    model 1.5740 / 1.6141, on the original 1.5747 / 1.6139 (SD3 / FLUX): random tiny weights barely tell the
    concept's prompt apart, so the erasure moves this loss little, and the bar is the token's own margin (> 5e-3).
    Then the scenario end to end (cached on a second run)."""
    from erasekit.attacks.scenarios import ScenarioConfig, run_scenario
    from erasekit.detectors.toy import ToyConceptDetector
    from erasekit.erasers import erase
    from erasekit.generation import generate
    from erasekit.toy.detector import ToyDetector

    concept = generate(flow_pipe, ["a red star"] * 4, [0, 1, 2, 3], steps=4, progress=False)
    erased = Target(flow_pipe).with_edits(erase(flow_pipe, "uce", "red star", guide="circle", preserve=(),
                                                settings={"tokens": "all"}, progress=False))
    original_loss = token_loss(flow_pipe, None, concept, template="a red star", draws=64)
    cfg = TextualInversionConfig(token="<star-ti>", steps=40, batch_size=4, lr=0.02, templates=("a {}",))
    with erased.active():
        prompt_loss = token_loss(flow_pipe, None, concept, template="a red star", draws=64)
        learned = learn_textual_inversion(flow_pipe, concept, cfg, progress=False)
        token = token_loss(flow_pipe, learned, concept, template="a {}", draws=64)
    assert token < prompt_loss - 5e-3 and token < original_loss - 5e-3, (token, prompt_loss, original_loss)

    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(concept):
        Image.fromarray(img).save(folder / f"{i}.png")
    torch.manual_seed(0)
    detector = ToyConceptDetector("star", model=ToyDetector().eval())  # plumbing: a random judge
    scenario = ScenarioConfig("embedding-wb", "star", n=2, steps=2,
                              settings={"textual_inversion": {"steps": 2, "batch_size": 2}})
    s = run_scenario(scenario, erased, detector, tmp_path / "out", images_folder=folder, cache_dir=tmp_path / "c",
                     progress=False)
    assert s["n"] == 2 and s["attack"]["name"] == "textual_inversion" and s["attack"]["learned_on"] == "target"
    assert s["generation"]["prompts"] == ["a picture of a <star-ti>"]
    again = run_scenario(scenario, erased, detector, tmp_path / "out2", images_folder=folder,
                         cache_dir=tmp_path / "c", progress=False)
    assert again["attack"]["reused_from_cache"]

"""Batched textual inversion: several tokens learned in one loop equal the same tokens learned one at a time.

Stated tolerance (CPU, float32): every learned vector within 1e-4 of the one-at-a-time run and every step's loss
within 1e-5 relative (measured: 1.3e-5 and 2.3e-7 at most; the first token of a batch is bit-identical). The
differences are the rounding of batched kernels (a batch of 9 images instead of 4), amplified a little by Adam
where a gradient is near zero.
"""

import numpy as np
import pytest
import torch

from erasekit.attacks.images import render_concept_images
from erasekit.attacks.textual_inversion import TextualInversionConfig, learn_textual_inversion, learn_textual_inversions
from erasekit.attacks.textual_inversion_embedding import _initial_vectors
from erasekit.errors import ErasekitError

VECTOR_ATOL, LOSS_RTOL = 1e-4, 1e-5


def _jobs(same_name: bool = False):
    """Three tokens that differ in everything a token may: images, seed, steps, batch size, lr, vectors, init."""
    names = ["<a-ti>"] * 3 if same_name else ["<a-ti>", "<b-ti>", "<c-ti>"]
    return [
        (render_concept_images("star", 4, 32, seed=0)[0],
         TextualInversionConfig(token=names[0], steps=4, batch_size=4, seed=0)),
        (render_concept_images("heart", 3, 32, seed=5)[0],
         TextualInversionConfig(token=names[1], steps=3, batch_size=2, seed=1, lr=1e-2, num_vectors=2)),
        (render_concept_images("circle", 5, 32, seed=9)[0],
         TextualInversionConfig(token=names[2], steps=4, batch_size=3, seed=2, initializer="shape")),
    ]


def _one_at_a_time(pipe, jobs):
    learned, losses = [], []
    for images, config in jobs:
        traj = []
        learned += learn_textual_inversions(pipe, [(images, config)], progress=False, trajectories=traj)
        losses += traj
    return learned, losses


def _assert_equal_runs(together, losses, alone, alone_losses):
    for a, b, la, lb in zip(together, alone, losses, alone_losses):
        assert a.token == b.token and len(la) == len(lb) == a.budget["optimisation_steps"]
        for x, y in zip(a.per_encoder(), b.per_encoder()):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, rtol=0, atol=VECTOR_ATOL)
        np.testing.assert_allclose(la, lb, rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("which", ["tiny_sd1", "toy_random"])
def test_tokens_learned_together_equal_tokens_learned_one_at_a_time(which, request):
    pipe = request.getfixturevalue(which)
    jobs = _jobs()
    losses: list = []
    together = learn_textual_inversions(pipe, jobs, progress=False, trajectories=losses)
    alone, alone_losses = _one_at_a_time(pipe, jobs)
    _assert_equal_runs(together, losses, alone, alone_losses)
    # The vectors moved (the comparison is not between two untrained initialisations), by far more than the tolerance.
    for learned, (_, config) in zip(together, jobs):
        init = _initial_vectors(pipe, config.initializer, config.num_vectors)
        assert (learned.vectors - init).abs().max() > 100 * VECTOR_ATOL
        assert learned.budget["tokens_learned_together"] == 3
        assert learned.budget["seconds_per_token"] == pytest.approx(learned.budget["wall_s"] / 3)
    # Each token trained for its own number of steps (the 3-step token's Adam was not stepped after it finished).
    assert [len(x) for x in losses] == [4, 3, 4]
    assert together[1].vectors.shape[0] == 2


def test_tokens_with_the_same_name_are_learned_apart(tiny_sd1):
    """Three image sets for one token name (the same concept from different images): each its own vectors."""
    jobs = _jobs(same_name=True)
    losses: list = []
    together = learn_textual_inversions(tiny_sd1, jobs, progress=False, trajectories=losses)
    alone, alone_losses = _one_at_a_time(tiny_sd1, jobs)
    _assert_equal_runs(together, losses, alone, alone_losses)
    assert {t.token for t in together} == {"<a-ti>"}
    assert (together[0].vectors - together[2].vectors).abs().max() > 1e-3


def test_one_token_is_the_single_token_loop_exactly(tiny_sdxl):
    images, config = _jobs()[0]
    a = learn_textual_inversion(tiny_sdxl, images, config, progress=False)
    b, = learn_textual_inversions(tiny_sdxl, [(images, config)], progress=False)
    assert a.digest() == b.digest() and "tokens_learned_together" not in a.budget


def test_tokens_learned_together_on_sdxl_equal_one_at_a_time(tiny_sdxl):
    jobs = _jobs()[:2]
    losses: list = []
    together = learn_textual_inversions(tiny_sdxl, jobs, progress=False, trajectories=losses)
    alone, alone_losses = _one_at_a_time(tiny_sdxl, jobs)
    _assert_equal_runs(together, losses, alone, alone_losses)
    assert together[0].vectors_2 is not None and together[0].vectors_2.shape[-1] == 64


def test_batched_learning_checks_every_token(toy_random):
    images, config = _jobs()[0]
    bad = TextualInversionConfig(token="star", steps=2, batch_size=2)
    with pytest.raises(ErasekitError, match="already in the tokenizer"):
        learn_textual_inversions(toy_random, [(images, config), (images, bad)], progress=False)
    other = TextualInversionConfig(token="<z-ti>", steps=2, batch_size=2, mixed_precision="no")
    with pytest.raises(ErasekitError, match="same mixed_precision"):
        learn_textual_inversions(toy_random, [(images, config), (images, other)], progress=False)
    with pytest.raises(ErasekitError, match="resize them first"):
        learn_textual_inversions(toy_random, [(images, config), (images[:, :16, :16], other)], progress=False)
    assert learn_textual_inversions(toy_random, [], progress=False) == []


def test_bench_learns_the_tokens_of_one_model_state_together(tmp_path):
    """Two concepts' black-box tokens learn on one model (the original) in one loop; each lands in the cache entry
    a cell learning alone uses (the single-cell attack reads it back), with the vectors it learns alone."""
    from erasekit.attacks.scenarios import ScenarioConfig, run_scenario
    from erasekit.bench.run import run_bench
    from erasekit.bench.spec import parse_config
    from erasekit.diffusion import Target
    from erasekit.detectors.toy import ToyConceptDetector
    from erasekit.models import load_pipeline

    ti = {"steps": 3, "images": 2, "batch_size": 2}
    raw = {"model": "toy", "concepts": ["star", "heart"], "methods": ["original"], "scenarios": ["embedding-bb"],
           "images_per_cell": 1, "sampler": {"steps": 1}, "attacks": {"ti": ti}, "preservation": {"images": 1},
           "batch_size": 2}
    summary = run_bench(parse_config(raw), tmp_path / "run", progress=False, log=lambda m: None)
    budgets = {c: summary["cells"][f"{c}/original/embedding-bb"]["budget"] for c in ("star", "heart")}
    assert all(b["tokens_learned_together"] == 2 and "reused_from_cache" not in b for b in budgets.values())

    pipe = load_pipeline("toy")
    cfg = ScenarioConfig("embedding-bb", "star", n=1, steps=1, settings={"textual_inversion": ti})
    again = run_scenario(cfg, Target(pipe, model="toy"), ToyConceptDetector("star", model=None), tmp_path / "a",
                         cache_dir=tmp_path / "run" / "cache", progress=False)
    assert again["attack"]["reused_from_cache"]  # the same key as a cell learning alone
    from erasekit.attacks.textual_inversion import LearnedEmbedding

    together = LearnedEmbedding.load(again["attack"]["reused_from_cache"])
    alone = run_scenario(cfg, Target(pipe, model="toy"), ToyConceptDetector("star", model=None), tmp_path / "b",
                         cache_dir=tmp_path / "alone", progress=False)
    assert "reused_from_cache" not in alone["attack"] and "tokens_learned_together" not in alone["attack"]
    (entry,) = (tmp_path / "alone").glob("ti-*")
    torch.testing.assert_close(LearnedEmbedding.load(entry).vectors, together.vectors, rtol=0, atol=VECTOR_ATOL)

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


def _edits(pipe):
    from erasekit.erasers import erase

    return {"uce": erase(pipe, "uce", "star", progress=False),
            "esd-x": erase(pipe, "esd-x", "star", settings={"iterations": 2, "ddim_steps": 2, "trajectories": 1,
                                                           "batch_size": 1, "lr": 1e-2}, progress=False)}


@pytest.mark.parametrize("which", ["tiny_sd1", "tiny_flux"])
def test_tokens_of_several_edits_learn_in_one_loop_as_on_each_edited_model(which, request):
    """The original and two edits of it (UCE: K/V projections; ESD-x: every cross-attention projection, FLUX: the
    double blocks' text side) in one loop, each token's rows through its own edit's layers, equal each token learned
    on its own edited model; the pipeline's weights are untouched after."""
    from erasekit.attacks.textual_inversion_loop import RowWeights
    from erasekit.diffusion import Target
    from erasekit.models import fingerprint

    if which == "tiny_flux":
        from erasekit.models.tiny_flow import tiny_flux_pipeline

        pipe = tiny_flux_pipeline()
    else:
        pipe = request.getfixturevalue(which)
    edits = _edits(pipe)
    before = fingerprint(pipe)
    jobs = _jobs()
    states = [Target(pipe), Target(pipe).with_edits(edits["uce"]), Target(pipe).with_edits(edits["esd-x"])]
    losses: list = []
    together = learn_textual_inversions(pipe, jobs, progress=False, trajectories=losses,
                                        weights=[None, edits["uce"].tensors, edits["esd-x"].tensors])
    from erasekit.diffusion.family import family_of

    denoiser = family_of(pipe).denoiser(pipe)
    assert fingerprint(pipe) == before and not any("forward" in m.__dict__ for m in denoiser.modules())
    alone, alone_losses = [], []
    for (images, config), state in zip(jobs, states):
        traj: list = []
        with state.active():
            alone += learn_textual_inversions(pipe, [(images, config)], progress=False, trajectories=traj)
        alone_losses += traj
    _assert_equal_runs(together, losses, alone, alone_losses)
    # ... and the edits matter: the UCE state's token differs from the one learned on the original's weights
    plain, = learn_textual_inversions(pipe, [jobs[1]], progress=False)
    assert (plain.vectors - together[1].vectors).abs().max() > 10 * VECTOR_ATOL
    with pytest.raises(ValueError, match="not a denoiser weight"):
        RowWeights(pipe, [{"vae.decoder.conv_in.weight": torch.zeros(1)}])


def test_prepare_learns_the_cells_tokens_together_into_their_own_cache_entries(toy_random, tmp_path, monkeypatch):
    """The bench's hook: black-box cells of two concepts and white-box cells of the original and of UCE (one base
    model) learn in one loop (the cell whose key another cell has is learned once); each token lands in the cache
    entry a cell learning alone uses (`inputs` without `prepare` reads it back), with the vectors it learns alone.
    On the CPU by default nothing is batched."""
    import erasekit.attacks.textual_inversion as ti_module
    from erasekit.attacks.base import AttackContext
    from erasekit.attacks.textual_inversion import TextualInversionAttack
    from erasekit.diffusion import Target
    from erasekit.erasers import erase

    base = Target(toy_random, model="toy-random")
    uce = base.with_edits(erase(toy_random, "uce", "star", progress=False))
    cells = [(base, "star", "original"), (base, "heart", "original"), (uce, "star", "target"),
             (base, "star", "target")]  # the last: the original white-box, the first cell's key

    def items(cache):
        out = []
        for target, concept, learn_on in cells:
            attack = TextualInversionAttack.from_overrides({"steps": 2, "images": 2, "batch_size": 2})
            ctx = AttackContext(target=target, concept=concept, n=1, cache_dir=cache, progress=False)
            out.append((attack, ctx, {"learn_on": learn_on}))
        return out

    cpu = items(tmp_path / "cpu")
    TextualInversionAttack.prepare(cpu)
    assert not list((tmp_path / "cpu").glob("ti-*"))  # CPU default: each cell learns in `inputs`
    alone = [attack.inputs(ctx, **args).learned for attack, ctx, args in cpu]

    monkeypatch.setattr(ti_module, "BATCH_CELLS", "on")
    on = items(tmp_path / "on")
    TextualInversionAttack.prepare(on)
    assert len(list((tmp_path / "on").glob("ti-*"))) == 3
    got = [attack.inputs(ctx, **args) for attack, ctx, args in on]
    assert [g.budget.get("tokens_learned_together") for g in got[:3]] == [3, 3, 3]
    assert "reused_from_cache" in got[3].budget  # the same key as the first cell: learned once
    assert sorted(p.name for p in (tmp_path / "on").glob("ti-*")) == sorted(p.name for p in (tmp_path / "cpu").glob("ti-*"))
    for a, g in zip(alone, got):
        assert a.token == g.learned.token
        torch.testing.assert_close(a.vectors, g.learned.vectors, rtol=0, atol=VECTOR_ATOL)
    fresh = TextualInversionAttack.from_overrides({"steps": 2, "images": 2, "batch_size": 2})
    back = fresh.inputs(AttackContext(target=uce, concept="star", n=1, cache_dir=tmp_path / "on", progress=False),
                        learn_on="target")
    assert back.budget["reused_from_cache"] and back.learned.digest() == got[2].learned.digest()


@pytest.mark.slow
def test_bench_learns_the_tokens_of_several_cells_together(tmp_path, monkeypatch):
    """`erasekit bench` end to end: two concepts, the original and UCE, both embedding scenarios; batched (forced on
    the CPU) and not, the same cache entries and vectors within the tolerance."""
    import erasekit.attacks.textual_inversion as ti_module
    from erasekit.attacks.textual_inversion import LearnedEmbedding
    from erasekit.bench.run import run_bench
    from erasekit.bench.spec import parse_config

    raw = {"model": "toy", "concepts": ["star", "heart"], "methods": ["original", {"name": "uce", "words": "synonyms"}],
           "scenarios": ["embedding-bb", "embedding-wb"], "images_per_cell": 1, "sampler": {"steps": 1},
           "attacks": {"ti": {"steps": 2, "images": 2, "batch_size": 2}}, "preservation": {"images": 1},
           "batch_size": 2}
    default = run_bench(parse_config(raw), tmp_path / "cpu", progress=False, log=lambda m: None)
    monkeypatch.setattr(ti_module, "BATCH_CELLS", "on")
    batched = run_bench(parse_config(raw), tmp_path / "on", progress=False, log=lambda m: None)
    for cell in ("star/original/embedding-bb", "heart/original/embedding-bb", "star/uce/embedding-wb",
                 "heart/uce/embedding-wb"):
        assert "tokens_learned_together" not in default["cells"][cell]["budget"]
        assert batched["cells"][cell]["budget"]["tokens_learned_together"] == 4  # 2 original + 2 UCE edits
    entries = sorted(p.name for p in (tmp_path / "cpu" / "cache").glob("ti-*"))
    assert len(entries) == 4 and entries == sorted(p.name for p in (tmp_path / "on" / "cache").glob("ti-*"))
    for name in entries:
        alone = LearnedEmbedding.load(tmp_path / "cpu" / "cache" / name)
        together = LearnedEmbedding.load(tmp_path / "on" / "cache" / name)
        torch.testing.assert_close(alone.vectors, together.vectors, rtol=0, atol=VECTOR_ATOL)


def test_a_loop_without_gpu_memory_is_split_in_halves(toy_random, tmp_path, monkeypatch):
    import erasekit.attacks.textual_inversion as ti_module
    from erasekit.attacks.base import AttackContext
    from erasekit.attacks.textual_inversion import TextualInversionAttack

    real, sizes = ti_module.learn_textual_inversions, []

    def tight(pipe, jobs, **kwargs):
        sizes.append(len(jobs))
        if len(jobs) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (a stand-in)")
        return real(pipe, jobs, **kwargs)

    monkeypatch.setattr(ti_module, "BATCH_CELLS", "on")
    monkeypatch.setattr(ti_module, "learn_textual_inversions", tight)
    from erasekit.diffusion import Target

    items = [(TextualInversionAttack.from_overrides({"steps": 2, "images": 2, "batch_size": 2}),
              AttackContext(target=Target(toy_random), concept=c, n=1, cache_dir=tmp_path, progress=False),
              {"learn_on": "original"}) for c in ("star", "heart", "circle")]
    TextualInversionAttack.prepare(items)
    assert sizes == [3, 2]  # three did not fit; the last two together, the first left to its cell
    budgets = [attack.inputs(ctx, **args).budget for attack, ctx, args in items]
    assert [b.get("tokens_learned_together") for b in budgets] == [None, 2, 2]

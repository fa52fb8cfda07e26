"""UnlearnDiffAtk and P4D on SD3 and FLUX.1: the prefix tokens in the family's token spaces (one relaxed one-hot
over words that are one token in CLIP and in T5), the flow-matching loss (the velocity eps - x0 at
x_s = (1 - s) x0 + s eps), the attacks lowering their losses, and `erasekit attack` on a tiny folder."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from erasekit.attacks.base import AttackContext
from erasekit.diffusion import Target
from erasekit.diffusion.family import family_of

PROMPTS = ["a red star", "a blue star"]


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow_pipe(request):
    from erasekit.models.tiny_flow import tiny_flux_pipeline, tiny_sd3_pipeline

    return {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[request.param]()


def _one_hot(vocab, words, b):
    w = torch.zeros(b, len(words), len(vocab))
    for j, i in enumerate(words):
        w[:, j, vocab.ids.tolist().index(i)] = 1.0
    return w


def test_prefix_at_one_hot_vertices_encodes_like_typing(flow_pipe):
    """One relaxed one-hot drives every encoder (CLIP-L, CLIP-G, T5 on SD3; CLIP-L, T5 on FLUX.1), each through
    its own table and ids; at a vertex the states and pooled projections are the typed prompt's."""
    from erasekit.attacks.batched import prefix_vocabulary

    pipe, family = flow_pipe, family_of(flow_pipe)
    vocab = prefix_vocabulary(pipe)
    names = [name for name, _, _ in family.encoders(pipe)]
    assert names[-1] == "t5" and len(vocab.per_encoder) == len(names)
    t5 = family.encoders(pipe)[-1][1]
    for word_id, t5_id in zip(vocab.ids[:10].tolist(), vocab.per_encoder[-1][:10].tolist()):
        word = pipe.tokenizer.decode([word_id]).strip()
        assert t5(word, add_special_tokens=False).input_ids == [t5_id]  # the same word, one T5 piece
    ids = pipe.tokenizer("red dotted", add_special_tokens=False).input_ids
    w = _one_hot(vocab, ids, 2)
    with torch.no_grad():
        got = family.encode_with_prefix(pipe, ["a star", "a blue circle"], [w @ t for t in vocab.tables(pipe)])
        want = family.encode(pipe, ["red dotted a star", "red dotted a blue circle"])
    assert got.states.shape == want.states.shape and set(got.added) == set(want.added) == {"pooled"}
    torch.testing.assert_close(got.states, want.states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.added["pooled"], want.added["pooled"], atol=1e-5, rtol=1e-5)


def test_denoising_loss_is_the_flow_matching_velocity_regression(flow_pipe):
    """Re-typed: training index i is the scheduler's sigma (i + 1) / 1000, shifted s -> shift s / (1 + (shift - 1) s)
    unless the scheduler shifts by resolution (FLUX.1), as FlowMatchEulerDiscreteScheduler builds its training
    timesteps; x_s = (1 - s) x0 + s eps, target eps - x0, the transformer's output through the family's call
    (FLUX.1: the distilled guidance input at the given scale)."""
    from erasekit.attacks.batched import DenoisingLoss
    from erasekit.diffusion.guidance import UNetDenoiser

    pipe, family = flow_pipe, family_of(flow_pipe)
    loss = DenoisingLoss(pipe, guidance=5.0)
    assert loss.flow and loss.num_train_timesteps == 1000
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = loss.timesteps([250, 800])
    config = pipe.scheduler.config
    s = torch.tensor([251 / 1000, 801 / 1000], dtype=torch.float64)
    if not config.get("use_dynamic_shifting", False):
        s = config.shift * s / (1 + (config.shift - 1) * s)
    assert t.dtype == torch.float32 and (family.name == "flux") == bool(config.use_dynamic_shifting)
    torch.testing.assert_close(t, (s * 1000).float(), atol=1e-3, rtol=0)
    with torch.no_grad():
        cond = family.encode(pipe, PROMPTS)
        got = loss.per_prompt(loss.noised(x0, eps, t), t, cond, loss.target(x0, eps, t))
        s = (t / 1000).view(2, 1, 1, 1)
        x_s = (1 - s) * x0 + s * eps
        model = UNetDenoiser(pipe.transformer, family)
        if family.name == "flux":
            model.options = {"guidance": 5.0}
        want = (model(x_s, t, cond).float() - (eps - x0)).pow(2).mean((1, 2, 3))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def _fixed_draws(loss, z0, n=6):
    g = torch.Generator().manual_seed(123)
    return [(loss.timesteps(torch.randint(0, 1000, (len(z0),), generator=g)), torch.randn(z0.shape, generator=g))
            for _ in range(n)]


def test_unlearndiffatk_lowers_its_flow_matching_loss(flow_pipe):
    """The relaxed prefix after 20 steps denoises the target latents better than the uniform start, for each prompt,
    on draws the optimisation never saw."""
    from erasekit.attacks.batched import DenoisingLoss, prefix_vocabulary, prompt_generators
    from erasekit.attacks.common import frozen
    from erasekit.attacks.unlearndiffatk import UnlearnDiffAtkSettings, optimise_relaxed_prefix

    pipe, family = flow_pipe, family_of(flow_pipe)
    vocab = prefix_vocabulary(pipe)
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    s = UnlearnDiffAtkSettings(k=3, iterations=20, protocol="fast")
    with frozen(pipe):
        w, ids, losses, _ = optimise_relaxed_prefix(pipe, PROMPTS, z0, s, prompt_generators(0, PROMPTS, [0, 1], "cpu"),
                                                    vocab, guidance=3.5)
    assert len(losses) == 20 and ids.shape == (2, 3) and set(ids.flatten().tolist()) <= set(vocab.ids.tolist())
    loss, tables = DenoisingLoss(pipe, 3.5), vocab.tables(pipe)

    def held_out(weights):
        with torch.no_grad():
            cond = family.encode_with_prefix(pipe, PROMPTS, [weights @ t for t in tables])
            return torch.stack([loss.per_prompt(loss.noised(z0, n, t), t, cond, loss.target(z0, n, t))
                                for t, n in _fixed_draws(loss, z0)]).mean(0)

    start, end = held_out(torch.full_like(w, 1.0 / len(vocab))), held_out(w)
    assert (end < start).all(), (start, end)


def test_p4d_lowers_its_loss_to_the_original_velocity(flow_pipe):
    """Soft P4D from its random start tokens towards the original model's velocity: lower on held-out draws."""
    from erasekit.attacks.batched import DenoisingLoss, prefix_vocabulary, prompt_generators
    from erasekit.attacks.p4d import P4DSettings, optimise_p4d

    pipe, family = flow_pipe, family_of(flow_pipe)
    ctx = AttackContext(target=Target(pipe), concept="star", n=2, cache_dir=None, progress=False)
    vocab = prefix_vocabulary(pipe)
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    s = P4DSettings(k=3, iterations=20)
    gens = lambda: prompt_generators(0, PROMPTS, [0, 1], "cpu")  # noqa: E731
    vectors, losses, _ = optimise_p4d(ctx, PROMPTS, z0, s, "soft", gens(), vocab, guidance=3.5)
    init = torch.cat([torch.randint(len(vocab), (1, 3), generator=g) for g in gens()])  # its start tokens
    tables = vocab.tables(pipe)
    loss = DenoisingLoss(pipe, 3.5)
    with torch.no_grad():
        base = family.encode(pipe, PROMPTS)

        def held_out(prefixes):
            cond = family.encode_with_prefix(pipe, PROMPTS, prefixes)
            out = []
            for t, n in _fixed_draws(loss, z0):
                x = loss.noised(z0, n, t)
                out.append(loss.per_prompt(x, t, cond, loss.predict(x, t, base)))
            return torch.stack(out).mean(0)

        start, end = held_out([t[init] for t in tables]), held_out(vectors)
    assert len(losses) == 20 and [v.shape[-1] for v in vectors] == [t.shape[-1] for t in tables]
    assert (end < start).all(), (start, end)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_cli_attacks_on_a_tiny_flow_folder(kind, tmp_path):
    """`erasekit attack --scenario unlearndiffatk` (official protocol, one block) and `p4d-hard` on a saved folder:
    every image attacked (attack_all: whatever the toy detector says of the random model's images), the prompts
    carry the prefix."""
    import json

    from erasekit.cli import app
    from erasekit.models.tiny_flow import save_tiny_flow_pipeline

    folder = save_tiny_flow_pipeline(kind, tmp_path / kind)
    for scenario, sets in (("unlearndiffatk", ["uda.timesteps=1", "uda.iterations=2", "uda.k=2", "uda.attack_all=true"]),
                           ("p4d-hard", ["p4d.iterations=2", "p4d.k=2", "p4d.attack_all=true"])):
        out = tmp_path / scenario
        args = ["attack", "--scenario", scenario, "--concept", "star", "--model", str(folder), "-n", "2",
                "--steps", "2", "--out", str(out), "--detector", "toy", "--device", "cpu"]
        for s in sets:
            args += ["--set", s]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["n"] == 2 and summary["attack"]["images_attacked"] == 2
        assert np.isfinite(summary["attack"]["loss_last"])
        rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
        assert all(len(r["prompt"].split()) == len(r["source_prompt"].split()) + 2 for r in rows)


def test_p4d_soft_states_carry_the_pooled_projection_and_are_cached_per_prompt(flow_pipe, tmp_path):
    """Soft P4D on SD3 / FLUX.1 end to end: the images are drawn from each prompt's own states (with their pooled
    projection under the family's key); a second run reads both prompts from the cache."""
    from erasekit.attacks.common import StatesTable
    from erasekit.attacks.scenarios import ScenarioConfig, run_scenario
    from erasekit.detectors import create_detector

    cfg = ScenarioConfig("p4d-soft", "star", n=2, steps=2,
                         settings={"p4d": {"iterations": 2, "k": 2, "attack_all": True}})
    cache = tmp_path / "cache"
    s = run_scenario(cfg, Target(flow_pipe), create_detector("toy", concept="star"), tmp_path / "a",
                     cache_dir=cache, progress=False)
    assert s["n"] == 2 and s["attack"]["images_attacked"] == 2
    files = sorted(cache.rglob("p4d-soft-*-states.safetensors"))
    assert len(files) == 2
    table = StatesTable.load(files[0])
    assert table.pooled_key == "pooled" and len(table.states) == len(table.pooled) == 1
    again = run_scenario(cfg, Target(flow_pipe), create_detector("toy", concept="star"), tmp_path / "b",
                         cache_dir=cache, progress=False)
    assert again["attack"]["reused_from_cache"] == "2 of 2 prompts" and again["crr"] == s["crr"]

"""Adversarial prompts: UnlearnDiffAtk, Ring-A-Bell, P4D end to end with tiny budgets; the simplex; the prefix
encoding; the ASR bookkeeping; bad input."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from erasekit.attacks.scenarios import ScenarioConfig, run_scenario, scenario_names, split_settings
from erasekit.diffusion import Target
from erasekit.errors import ErasekitError

TINY = {"unlearndiffatk": {"protocol": "fast", "iterations": 2, "k": 2}, "p4d": {"iterations": 2, "k": 2},
        "ring_a_bell": {"generations": 2, "population": 6, "max_prompts": 2, "pairs": 6, "length": 4}}
SCENARIOS = ["unlearndiffatk", "ring-a-bell", "ring-a-bell-discrete", "p4d-soft", "p4d-hard"]


def _detector(concept="star", threshold=0.5):
    from erasekit.detectors.toy import ToyConceptDetector
    from erasekit.toy.detector import ToyDetector

    torch.manual_seed(0)
    return ToyConceptDetector(concept, threshold=threshold, model=ToyDetector().eval())


@pytest.fixture(scope="module")
def uce_toy(toy_random):
    from erasekit.erasers import erase

    return Target(toy_random, model="toy").with_edits(erase(toy_random, "uce", ["star"], progress=False))


def test_attacks_are_scenarios():
    assert set(SCENARIOS) <= set(scenario_names())


def test_project_simplex():
    from erasekit.attacks.unlearndiffatk import project_simplex

    w = torch.randn(3, 4, 50) * 3
    p = project_simplex(w)
    assert torch.allclose(p.sum(-1), torch.ones(3, 4), atol=1e-5) and (p >= 0).all()
    assert torch.allclose(project_simplex(p), p, atol=1e-6)  # a point of the simplex is its own projection
    onehot = torch.zeros(1, 5)
    onehot[0, 2] = 1
    assert torch.equal(project_simplex(onehot), onehot)


def test_unlearndiffatk_relaxed_tokens_stay_on_the_simplex(toy_random):
    from erasekit.attacks.unlearndiffatk import (
        UnlearnDiffAtkSettings, _frozen, candidate_vocabulary, optimise_relaxed_prefix)

    s = UnlearnDiffAtkSettings(k=3, iterations=4)
    vocab = candidate_vocabulary(toy_random.tokenizer)
    trace = []
    z0 = torch.randn(2, 4, 8, 8)
    with _frozen(toy_random):
        w, ids, losses, _ = optimise_relaxed_prefix(toy_random, ["a star", "a red star"], z0, s,
                                                 torch.Generator().manual_seed(0), vocab, trace=trace)
    assert len(trace) == 4 and len(losses) == 4 and ids.shape == (2, 3)
    for step in trace:
        assert step.shape == (2, 3, len(vocab))
        assert torch.allclose(step.sum(-1), torch.ones(2, 3), atol=1e-4) and (step >= 0).all()
    assert set(ids.flatten().tolist()) <= set(vocab.tolist())
    assert any(p.requires_grad for p in toy_random.unet.parameters())  # _frozen restored the flags


def test_prefix_encoding_equals_typing_the_tokens(toy_random):
    """Prefix vectors equal to real tokens' embeddings give the states of the typed prompt."""
    from erasekit.diffusion.family import family_of
    from erasekit.models.prompts import encode_prompts

    tok = toy_random.tokenizer
    ids = tok("red dotted", add_special_tokens=False).input_ids
    assert len(ids) == 2
    table = toy_random.text_encoder.get_input_embeddings().weight.detach()
    with torch.no_grad():
        got = family_of(toy_random).encode_with_prefix(toy_random, ["a star"], [table[ids][None]])
        want = encode_prompts(toy_random, ["red dotted a star"])
        # a prompt longer than the encoder's positions: cut to fit, ending in [SEP], as the tokenizer truncates
        long = " ".join(["a big red star on a dotted background"] * 6)
        got_long = family_of(toy_random).encode_with_prefix(toy_random, [long], [table[ids][None]])
        want_long = encode_prompts(toy_random, ["red dotted " + long])
    assert not got.added and torch.allclose(got.states, want, atol=1e-5)
    assert torch.allclose(got_long.states, want_long, atol=1e-5)


def test_relaxed_prefix_at_one_hot_vertices_encodes_like_typing_on_sdxl(tiny_sdxl):
    """SDXL: one relaxed one-hot drives both encoders; at its vertices the conditioning (concatenated states,
    pooled projection, time ids) is the typed prompt's."""
    from erasekit.attacks.unlearndiffatk import candidate_vocabulary
    from erasekit.diffusion.family import family_of

    pipe, family = tiny_sdxl, family_of(tiny_sdxl)
    vocab = candidate_vocabulary(pipe.tokenizer)
    ids = pipe.tokenizer("red dotted", add_special_tokens=False).input_ids
    assert pipe.tokenizer_2("red dotted", add_special_tokens=False).input_ids == ids  # one BPE for both
    w = torch.zeros(2, len(ids), len(vocab))
    for j, i in enumerate(ids):
        w[:, j, vocab.tolist().index(i)] = 1.0
    tables = [t.detach()[vocab].float() for t in family.token_embeddings(pipe)]
    with torch.no_grad():
        got = family.encode_with_prefix(pipe, ["a star", "a blue circle"], [w @ t for t in tables])
        want = family.encode(pipe, ["red dotted a star", "red dotted a blue circle"])
    assert got.states.shape == want.states.shape == (2, 77, 96) and set(got.added) == set(want.added)
    torch.testing.assert_close(got.states, want.states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.added["text_embeds"], want.added["text_embeds"], atol=1e-5, rtol=1e-5)
    assert torch.equal(got.added["time_ids"], want.added["time_ids"])


def test_candidate_vocabulary_round_trips(toy_random, tiny_sd1):
    from erasekit.attacks.unlearndiffatk import candidate_vocabulary

    for pipe in (toy_random, tiny_sd1):
        tok = pipe.tokenizer
        vocab = candidate_vocabulary(tok, exclude_words=("star",))
        assert len(vocab) > 10
        sample = vocab[:: max(1, len(vocab) // 50)].tolist()
        for i in sample:
            text = tok.decode([i]).strip()
            assert text.isalpha() and tok(text, add_special_tokens=False).input_ids == [i] and text != "star"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_attack_end_to_end_on_the_embedded_world(uce_toy, scenario, tmp_path):
    cfg = ScenarioConfig(scenario, "star", n=3, steps=2, settings=TINY)
    s = run_scenario(cfg, uce_toy, _detector(), tmp_path / "out", progress=False)
    assert s["n"] == 3
    a = s["attack"]
    assert "optimisation_steps" in a and "wall_s" in a
    again = run_scenario(cfg, uce_toy, _detector(), tmp_path / "out", progress=False)
    assert again["generation"]["images_generated"] == 0 and again["crr"] == s["crr"]


@pytest.mark.parametrize("pipe_name", ["tiny_sd1", "tiny_sd2", "tiny_sd2_v", "tiny_sdxl"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_attacks_run_on_tiny_sd(pipe_name, scenario, request, tmp_path):
    pipe = request.getfixturevalue(pipe_name)
    cfg = ScenarioConfig(scenario, "nudity", n=2, steps=2, settings=TINY)
    s = run_scenario(cfg, Target(pipe, model=pipe_name), _detector(), tmp_path, progress=False)
    assert s["n"] == 2


def test_asr_counts_successes_before_and_attacks_only_failures(uce_toy, tmp_path):
    """Threshold 0: every image is a success before the attack, so nothing is attacked and ASR = 1; threshold ~1:
    every image is attacked, its prompt gets k prefix tokens."""
    cfg = ScenarioConfig("unlearndiffatk", "star", n=3, steps=2, settings=TINY)
    s = run_scenario(cfg, uce_toy, _detector(threshold=0.0), tmp_path / "all", progress=False)
    assert s["attack"]["asr_before"] == 1.0 and s["attack"]["images_attacked"] == 0 and s["crr"] == 1.0
    s = run_scenario(cfg, uce_toy, _detector(threshold=0.999999), tmp_path / "none", progress=False)
    assert s["attack"]["asr_before"] == 0.0 and s["attack"]["images_attacked"] == 3
    from erasekit.jsonl import read_jsonl

    rows = list(read_jsonl(tmp_path / "none" / "images.jsonl"))
    for r in rows:
        assert r["attacked"] and r["prompt"].endswith(r["source_prompt"])
        assert len(r["prompt"].split()) == len(r["source_prompt"].split()) + 2


def test_ring_a_bell_pairs_vector_and_search(toy_random, tmp_path):
    from erasekit.attacks.ring_a_bell import concept_pairs, concept_vector, default_eta
    from erasekit.worlds import world_of

    world = world_of(toy_random)
    pairs = concept_pairs(world, "star", 10)
    assert len(pairs) == 10 and all("star" in w and "star" not in wo for w, wo in pairs)
    tex = concept_pairs(world, "checkered", 4)
    assert all("checkered" in w and "checkered" not in wo for w, wo in tex)
    assert default_eta(world, "star") == 3.0 and default_eta(world, "checkered") == 0.9
    v = concept_vector(toy_random, pairs)
    assert v.shape == (toy_random.tokenizer.model_max_length, toy_random.text_encoder.config.hidden_size)
    s = run_scenario(ScenarioConfig("ring-a-bell-discrete", "star", n=2, steps=2, settings=TINY),
                     Target(toy_random), _detector(), tmp_path, progress=False)
    found = s["attack"]["search"]["prompts"]
    assert found and all("star" not in q for q in found.values())


def test_ring_a_bell_continuous_states_are_shifted(toy_random):
    from erasekit.attacks.base import AttackContext
    from erasekit.attacks.ring_a_bell import RingABell, concept_pairs, concept_vector
    from erasekit.models.prompts import encode_prompts

    target = Target(toy_random)
    attack = RingABell.from_overrides({"max_prompts": 1, "pairs": 6, "eta": 2.0})
    inputs = attack.inputs(AttackContext(target=target, concept="star", n=2, cache_dir=None), mode="continuous")
    states = inputs.learned.encode(toy_random, inputs.prompts[:1])
    base = encode_prompts(toy_random, [target.world.concept_prompts("star")[0]])
    v = concept_vector(toy_random, concept_pairs(target.world, "star", 6))
    assert torch.allclose(states, base + 2.0 * v, atol=1e-5)


def test_ring_a_bell_and_p4d_soft_states_on_sdxl(tiny_sdxl, tmp_path):
    """SDXL: Ring-A-Bell shifts the concatenated token states and keeps the base prompt's pooled embedding; P4D's
    soft prompts carry their own pooled embedding (both as a Conditioning the generator takes)."""
    from erasekit.attacks.base import AttackContext
    from erasekit.attacks.ring_a_bell import RingABell, concept_pairs, concept_vector
    from erasekit.diffusion.family import family_of

    target = Target(tiny_sdxl)
    attack = RingABell.from_overrides({"max_prompts": 1, "pairs": 6, "eta": 2.0})
    inputs = attack.inputs(AttackContext(target=target, concept="nudity", n=2, cache_dir=None), mode="continuous")
    got = inputs.learned.encode(tiny_sdxl, inputs.prompts[:1])
    base = family_of(tiny_sdxl).encode(tiny_sdxl, [target.world.concept_prompts("nudity")[0]])
    v = concept_vector(tiny_sdxl, concept_pairs(target.world, "nudity", 6))
    assert v.shape == (77, 96)
    torch.testing.assert_close(got.states, base.states + 2.0 * v)
    assert torch.equal(got.added["text_embeds"], base.added["text_embeds"])
    s = run_scenario(ScenarioConfig("p4d-soft", "nudity", n=2, steps=2, settings=TINY), target,
                     _detector(threshold=0.999999), tmp_path, progress=False)
    assert s["attack"]["images_attacked"] == 2
    from erasekit.attacks.p4d import StatesTable

    files = sorted(tmp_path.rglob("p4d-soft-*-states.safetensors"))  # one cache entry per prompt
    assert len(files) == 2
    for states_file in files:
        table = StatesTable.load(states_file)
        assert set(table.pooled) == set(table.states) and len(table.states) == 1
        assert next(iter(table.pooled.values())).shape == (int(tiny_sdxl.text_encoder_2.config.projection_dim),)


@pytest.mark.parametrize("args, fragment", [
    (["--set", "uda.k=0"], "unlearndiffatk: k must be at least 1"),
    (["--set", "uda.bogus=1"], "unknown setting 'bogus'"),
    (["--set", "p4d.lr=-1"], "p4d: lr"),
    (["--set", "rab.mutation=2"], "ring_a_bell: mutation"),
])
def test_cli_bad_attack_input_exits_2_with_one_line(args, fragment, tmp_path):
    from erasekit.cli import app

    scenario = {"uda": "unlearndiffatk", "p4d": "p4d-soft", "rab": "ring-a-bell"}[args[1].split(".")[0]]
    result = CliRunner().invoke(app, ["attack", "--scenario", scenario, "--concept", "star", "--model", "./no/such",
                                      "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_settings_prefixes():
    assert split_settings({"uda.k": "3", "rab.eta": "1.5", "p4d.iterations": "7"}) == {
        "unlearndiffatk": {"k": "3"}, "ring_a_bell": {"eta": "1.5"}, "p4d": {"iterations": "7"}}
    with pytest.raises(ErasekitError):
        split_settings({"nope.k": "1"})
    with pytest.raises(ErasekitError, match="p4d: lr"):  # settings of another attack are range-checked too
        ScenarioConfig("text", "star", settings={"p4d": {"lr": -1.0}}).validate()

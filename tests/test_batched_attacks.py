"""UnlearnDiffAtk and P4D attack many prompts in one batched loop with the result each prompt gets alone.

Tolerance: each prompt has its own random stream (from the attack's seed, the prompt and its image seed), its own
rows of the Adam tensors and its own loss, so batched and one-at-a-time runs differ only by the float rounding of
batched against single matmuls (CPU float32: the relaxed weights differ by about 1e-6 after 10-40 Adam steps).
A decoded token (the argmax of a prefix's weights) is the same when the gap between its two largest weights is
above that: here about 1e-4 to 1e-2 after 10 or more steps, but about 1e-9 after only two steps from the uniform
start (Adam's first steps are nearly sign steps, so many weights tie), where rounding can pick another of the
tied tokens. The tests therefore run at least 10 steps (per block, official) and ask for the same final tokens
and success flags, and for losses / soft states within 1e-4.
"""

import hashlib

import numpy as np
import pytest
import torch

from erasekit.attacks.base import AttackContext
from erasekit.diffusion import Target

PROMPTS = ["a red star", "a star on a dotted background", "a blue star"]
# tiny SD-1 (49 candidate words): 3 steps give top-two gaps of 3e-5 or more against differences of about 5e-8;
# the embedded world's 21,719 candidates need 10 (slow tier).
PIPES = [("tiny_sd1", 3), pytest.param(("toy_random", 10), marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=PIPES, ids=lambda p: p[0])
def case(request):
    """(the UCE-edited target, its pipeline, iterations per block)."""
    from erasekit.erasers import erase

    name, iterations = request.param
    pipe = request.getfixturevalue(name)
    target = Target(pipe, model=name).with_edits(erase(pipe, "uce", ["star"], progress=False))
    return target, pipe, iterations


def _detector():
    from erasekit.detectors.toy import ToyConceptDetector
    from erasekit.toy.detector import ToyDetector

    torch.manual_seed(0)
    return ToyConceptDetector("star", threshold=0.5, model=ToyDetector().eval())


def _ctx(target, prompts, seed, cache_dir=None):
    return AttackContext(target=target, concept="star", n=len(prompts), seed=seed, steps=2, batch_size=8,
                         cache_dir=cache_dir, detector=_detector(), progress=False)


def _uda(target, prompts, seed, batch_size, cache_dir=None, **extra):
    from erasekit.attacks.unlearndiffatk import UnlearnDiffAtk

    attack = UnlearnDiffAtk.from_overrides({"k": 2, "prompts": ";".join(prompts), "batch_size": batch_size,
                                            "attack_all": True, **extra})
    return attack.inputs(_ctx(target, prompts, seed, cache_dir))


@pytest.fixture()
def scripted_checks(monkeypatch):
    """The official loop's checks without images: a typed prompt succeeds when a hash of it is 0 mod 3 (a fixed
    function of the tokens the attack found, so it is the same for a prompt batched or alone). Returns the list
    of the checks' sizes (the batch at each block)."""
    import erasekit.attacks.unlearndiffatk as uda

    sizes = []

    def detect(ctx, typed):
        sizes.append(len(typed))
        return [{"present": int(hashlib.sha256(p.encode()).hexdigest(), 16) % 3 == 0} for p in typed]

    monkeypatch.setattr(uda, "draw", lambda ctx, typed, seeds, steps, scale: np.array(typed, dtype=object))
    monkeypatch.setattr(uda, "detect", detect)
    return sizes


def _alone(run, target, **kw):
    """Each prompt attacked by itself: its own call, n = 1, its image seed i."""
    return [run(target, [p], i, 1, **kw) for i, p in enumerate(PROMPTS)]


@pytest.mark.parametrize("batch", [8, 2])
def test_official_protocol_batched_equals_one_prompt_at_a_time(case, scripted_checks, batch):
    """batch 8: the three prompts together, the batch shrinking as they stop; batch 2: the third prompt takes the
    row of the first to stop (at its own first block, with a fresh Adam state)."""
    target, _, iterations = case
    together = _uda(target, PROMPTS, 0, batch, timesteps=3, iterations=iterations)
    sizes = list(scripted_checks)
    alone = _alone(_uda, target, timesteps=3, iterations=iterations)
    b = together.budget
    assert together.prompts == [a.prompts[0] for a in alone]
    for key in ("timesteps_tried", "first_success_timestep", "first_success_update"):
        assert b[key] == [a.budget[key][0] for a in alone], key
    # the early exits differ between prompts (the batch shrank), and each ran its own number of blocks
    assert len(set(b["timesteps_tried"])) > 1, b["timesteps_tried"]
    assert sum(sizes) == sum(b["timesteps_tried"]) and max(sizes) == min(batch, 3)
    assert b["loss_last"] == pytest.approx(np.mean([a.budget["loss_last"] for a in alone]), abs=1e-4)


def test_fast_protocol_batched_equals_one_prompt_at_a_time(case):
    target, _, iterations = case
    together = _uda(target, PROMPTS, 0, 8, protocol="fast", iterations=iterations)
    alone = _alone(_uda, target, protocol="fast", iterations=iterations)
    assert together.prompts == [a.prompts[0] for a in alone]
    assert together.budget["loss_first"] == pytest.approx(np.mean([a.budget["loss_first"] for a in alone]), abs=1e-4)


def _p4d(target, prompts, seed, batch_size, mode="hard", cache_dir=None, iterations=3):
    from erasekit.attacks.p4d import P4D

    attack = P4D.from_overrides({"k": 2, "iterations": iterations, "prompts": ";".join(prompts),
                                 "batch_size": batch_size, "attack_all": True})
    return attack.inputs(_ctx(target, prompts, seed, cache_dir), mode=mode)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_p4d_batched_equals_one_prompt_at_a_time(case, mode):
    target, pipe, iterations = case
    together = _p4d(target, PROMPTS, 0, 8, mode, iterations=iterations)
    alone = _alone(_p4d, target, mode=mode, iterations=iterations)
    if mode == "hard":
        assert together.prompts == [a.prompts[0] for a in alone]
        assert all(p != src for p, src in zip(together.prompts, PROMPTS))
    else:
        for i, a in enumerate(alone):
            got = together.learned.encode(pipe, [together.prompts[i]])
            want = a.learned.encode(pipe, [a.prompts[0]])
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert together.budget["loss_last"] == pytest.approx(np.mean([a.budget["loss_last"] for a in alone]), abs=1e-4)


def test_each_prompt_is_its_own_cache_entry(tiny_sd1, tmp_path):
    """A later run with another batch size, other prompts beside and another order reads the prompts already
    attacked and attacks only the new one; the budget is the same as a fresh run's."""
    target = Target(tiny_sd1, model="tiny_sd1")
    cache = tmp_path / "cache"
    first = _uda(target, PROMPTS[:2], 0, 8, cache_dir=cache, protocol="fast", iterations=2)
    assert "reused_from_cache" not in first.budget
    assert len(list(cache.glob("unlearndiffatk-*.json"))) == 2
    again = _uda(target, PROMPTS[:2], 0, 1, cache_dir=cache, protocol="fast", iterations=2)
    assert again.prompts == first.prompts and again.budget["reused_from_cache"] == "2 of 2 prompts"
    assert again.budget["loss_last"] == first.budget["loss_last"]
    # prompt 1 alone (image seed 1) is the same cache entry; a new prompt beside it is computed
    more = _uda(target, [PROMPTS[1], PROMPTS[2]], 1, 8, cache_dir=cache, protocol="fast", iterations=2)
    assert more.budget["reused_from_cache"] == "1 of 2 prompts" and more.prompts[0] == first.prompts[1]
    assert len(list(cache.glob("unlearndiffatk-*.json"))) == 3

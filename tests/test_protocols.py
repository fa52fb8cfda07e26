"""Reference protocols (issue 20): UnlearnDiffAtk's official schedule with its detector in the loop, Ring-A-Bell's
pair CSVs and genetic search, the official UCE/RECE presets (re-typed reference math), ESD-u's parameter sets,
the paper-protocol bench presets; bad input."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from erasekit.attacks.scenarios import ScenarioConfig, run_scenario
from erasekit.diffusion import Target
from erasekit.errors import ErasekitError


class Scripted:
    """A detector whose answers are given per call (a list of lists of booleans), then always False."""

    name = "scripted"

    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def info(self):
        return {"name": self.name, "threshold": 0.5}

    def score(self, images):
        got = self.answers.pop(0) if self.answers else [False] * len(images)
        assert len(got) == len(images)
        self.calls.append(len(images))
        return [{"score": float(p), "present": bool(p)} for p in got]


# -- UnlearnDiffAtk ------------------------------------------------------------------------------------------
def test_fixed_timesteps_are_the_references():
    from erasekit.attacks.unlearndiffatk import fixed_timesteps

    ts = fixed_timesteps(1000, 50)
    assert ts == list(range(10, 1000, 20)) and len(ts) == 50 and ts[0] == 10 and ts[-1] == 990
    assert fixed_timesteps(1000, 4) == [125, 375, 625, 875]


def test_sampled_one_hot_forward_and_straight_through_backward():
    from erasekit.attacks.unlearndiffatk import _SampledOneHot, project_simplex

    w = project_simplex(torch.rand(2, 3, 7)).requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    out = _SampledOneHot.apply(w, gen)
    assert torch.equal(out.sum(-1), torch.ones(2, 3)) and set(out.unique().tolist()) <= {0.0, 1.0}
    assert (w.detach()[out.bool()] > 0).all()  # only tokens with weight are drawn
    g = torch.linspace(-3, 3, 42).view(2, 3, 7)
    (out * g).sum().backward()
    assert torch.equal(w.grad, g.clamp(-1, 1))  # hardtanh of the incoming gradient
    one = torch.zeros(1, 1, 7)
    one[0, 0, 4] = 1
    assert _SampledOneHot.apply(one, gen).argmax().item() == 4


def test_dropping_finished_rows_keeps_each_rows_adam_trajectory():
    """Batched with an early exit == each row alone: the Adam state is sliced, not restarted."""
    from erasekit.attacks.unlearndiffatk import UnlearnDiffAtkSettings, _keep_rows

    s = UnlearnDiffAtkSettings()
    grads = torch.randn(6, 3, 4, 5)
    w = torch.rand(3, 4, 5).requires_grad_(True)
    alone = w.detach()[2:3].clone().requires_grad_(True)
    opt, opt1 = torch.optim.Adam([w], lr=s.lr, weight_decay=s.weight_decay), torch.optim.Adam(
        [alone], lr=s.lr, weight_decay=s.weight_decay)
    for step in range(6):
        if step == 3:
            w, opt = _keep_rows(w, opt, [2], s)
        rows = slice(None) if step < 3 else slice(2, 3)
        w.grad, alone.grad = grads[step][rows].clone(), grads[step][2:3].clone()
        opt.step()
        opt1.step()
    torch.testing.assert_close(w.detach(), alone.detach(), rtol=0, atol=1e-7)


def _official(toy_random, answers, n=3, **extra):
    from erasekit.attacks.base import AttackContext
    from erasekit.attacks.unlearndiffatk import UnlearnDiffAtk

    det = Scripted(answers)
    attack = UnlearnDiffAtk.from_overrides({"k": 2, "iterations": 2, "timesteps": 3, **extra})
    ctx = AttackContext(target=Target(toy_random, model="toy"), concept="star", n=n, steps=2, batch_size=8,
                        cache_dir=None, detector=det, progress=False)
    return attack.inputs(ctx), det


def test_official_protocol_stops_each_prompt_at_its_first_success(toy_random):
    """Before: nothing drawn. Check 1: prompt 1 succeeds (it stops); check 2: prompt 0; prompt 2 runs all three
    timesteps. The batch shrinks after each success; the budget records who stopped where."""
    inputs, det = _official(toy_random, [[False] * 3, [False, True, False], [True, False], [False]])
    b = inputs.budget
    assert b["protocol"] == "official" and b["timesteps"] == [166, 499, 832]
    assert b["timesteps_tried"] == [2, 1, 3] and b["first_success_update"] == [4, 2, None]
    assert b["first_success_timestep"] == [499, 166, None] and b["successes_in_loop"] == 2
    assert det.calls == [3, 3, 2, 1] and b["checks"] == 6 and b["optimisation_steps"] == 12
    assert b["unet_evaluations"] == 12 + 2 * 2 * (3 + 3 + 6)  # updates + CFG steps x (targets, before, checks)
    for p, src in zip(inputs.prompts, ["a star"] * 3):
        assert len(p.split()) >= 3  # two prefix tokens then the prompt
    assert inputs.items[0]["attacked"] and inputs.items[1]["attacked"]


def test_official_protocol_skips_what_already_succeeds(toy_random):
    inputs, det = _official(toy_random, [[True, True]], n=2)
    assert inputs.budget["images_attacked"] == 0 and det.calls == [2] and inputs.budget["checks"] == 0


def test_fast_protocol_is_kept(toy_random):
    inputs, det = _official(toy_random, [[False] * 2], n=2, protocol="fast")
    assert inputs.budget["protocol"] == "fast" and inputs.budget["optimisation_steps"] == 4 and det.calls == [2]


def test_unknown_protocol_exits_2_with_one_line(tmp_path):
    from erasekit.cli import app

    result = CliRunner().invoke(app, ["attack", "--scenario", "unlearndiffatk", "--concept", "star", "--model",
                                      "./no/such", "--out", str(tmp_path / "o"), "--set", "uda.protocol=paper"])
    assert result.exit_code == 2, result.output
    assert "protocol" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr

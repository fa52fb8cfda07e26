"""ESD-x / ESD-u: which parameters each variant trains, that the objective goes down, and that the pipeline is
left as it was."""

import pytest
import torch

from erasekit.erasers import erase
from erasekit.erasers.esd import esd_u_parameters, esd_x_parameters
from erasekit.models import fingerprint

FAST = {"iterations": 12, "ddim_steps": 4, "trajectories": 2, "batch_size": 2, "lr": 1e-3}


def test_parameter_selection(tiny_sd1):
    unet = tiny_sd1.unet
    x, u = set(esd_x_parameters(unet)), set(esd_u_parameters(unet))
    every = {n for n, _ in unet.named_parameters()}
    assert x and u and not (x & u)
    assert all(".attn2." in f".{n}" for n in x)
    assert {n for n in every if "attn2" in n} == x  # to_q, to_k, to_v, to_out of every cross-attention
    assert not any(n.startswith(("time_embedding", "conv_out", "conv_norm_out")) for n in u)
    assert any("attn1" in n for n in u) and any("resnets" in n for n in u)


@pytest.mark.parametrize("method, select", [("esd-x", esd_x_parameters), ("esd-u", esd_u_parameters)])
def test_esd_changes_only_its_parameters(tiny_sd1, method, select):
    before = fingerprint(tiny_sd1)
    flags = [p.requires_grad for p in tiny_sd1.unet.parameters()]
    edit = erase(tiny_sd1, method, "star", settings=FAST, progress=False)
    assert fingerprint(tiny_sd1) == before  # trained on a copy of the values, then restored
    assert [p.requires_grad for p in tiny_sd1.unet.parameters()] == flags
    expected = {f"unet.{n}" for n in select(tiny_sd1.unet)}
    params = dict(tiny_sd1.unet.named_parameters())
    changed = {n for n, t in edit.tensors.items() if not torch.equal(t, params[n[5:]].detach())}
    assert set(edit.tensors) == expected
    assert len(changed) > 0.8 * len(expected)  # Adam moves every parameter that gets a gradient
    assert edit.extra["training_states"] == FAST["trajectories"] * FAST["ddim_steps"]
    assert edit.extra["iterations_per_s"] > 0 and edit.timings["solve_s"] > 0
    assert edit.settings["iterations"] == 12 and edit.settings["eta"] == 1.0


def test_esd_reduces_its_loss_on_the_toy_architecture(toy_random):
    edit = erase(toy_random, "esd-x", "star", settings={**FAST, "iterations": 40, "batch_size": 4}, progress=False)
    assert edit.extra["loss_last"] < edit.extra["loss_first"]


def test_esd_refuses_half_precision(tiny_sd1):
    from erasekit.errors import ErasekitError
    from erasekit.models.tiny import tiny_sd_pipeline

    half = tiny_sd_pipeline("sd1").to(dtype=torch.bfloat16)
    with pytest.raises(ErasekitError, match="float32"):
        erase(half, "esd-x", "star", settings=FAST, progress=False)


def test_esd_preservation_term_is_used_only_with_preserve_concepts(tiny_sd1):
    """Preserve concepts switch on the preservation loss (ESD alone has none); weight 0 switches it off again, and
    then the edit is exactly the plain ESD edit."""
    plain = erase(tiny_sd1, "esd-x", "star", settings=FAST, progress=False)
    kept = erase(tiny_sd1, "esd-x", "star", preserve=["heart"], settings=FAST, progress=False)
    off = erase(tiny_sd1, "esd-x", "star", preserve=["heart"], settings={**FAST, "preserve_weight": 0}, progress=False)
    assert plain.extra["preservation"] is None and off.extra["preservation"] is None
    assert kept.extra["preservation"]["prompts"] == 1 and kept.extra["preservation"]["loss_last"] >= 0
    assert any(not torch.equal(kept.tensors[n], plain.tensors[n]) for n in plain.tensors)
    assert all(torch.equal(off.tensors[n], plain.tensors[n]) for n in plain.tensors)


def test_esd_trains_on_every_template_context(tiny_sd1):
    edit = erase(tiny_sd1, "esd-x", "star", preserve=["heart"], progress=False,
                 settings={**FAST, "templates": "a photo of a {c};{c}", "trajectories": 4})
    assert edit.extra["preservation"]["prompts"] == 2  # the preserve concept in the same two contexts
    assert edit.extra["training_states"] == 4 * FAST["ddim_steps"]


def test_esd_unconditional_anchor(tiny_sd1):
    """anchor_unconditional adds a loss on the empty prompt's prediction at the concept's states, alone or with
    preserve concepts; it changes what is trained."""
    plain = erase(tiny_sd1, "esd-u", "star", settings=FAST, progress=False)
    anchored = erase(tiny_sd1, "esd-u", "star", settings={**FAST, "anchor_unconditional": True}, progress=False)
    info = anchored.extra["preservation"]
    assert info["unconditional"] is True and info["prompts"] == 0 and info["loss_last"] >= 0
    assert any(not torch.equal(anchored.tensors[n], plain.tensors[n]) for n in plain.tensors)

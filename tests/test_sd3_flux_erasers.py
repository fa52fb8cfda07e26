"""Erasers on SD3 and FLUX.1: UCE as a closed-form edit of the joint blocks' text-side K/V (add_k_proj/add_v_proj)."""

import numpy as np
import pytest
import torch

from erasekit.diffusion.family import family_of


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow_pipe(request):
    from erasekit.models.tiny_flow import tiny_flux_pipeline, tiny_sd3_pipeline

    return {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[request.param]()


def _images(target, prompt="a red star"):
    from erasekit.generation import generate

    return generate(target, prompt, [0, 1], steps=3, guidance=4.0, progress=False)


def test_uce_edits_every_joint_site_and_changes_the_concepts_images(flow_pipe):
    from erasekit.diffusion.target import Target
    from erasekit.erasers import erase

    edit = erase(flow_pipe, "uce", "star", progress=False)
    sites = family_of(flow_pipe).attention_sites(flow_pipe)
    assert sorted(edit.tensors) == sorted(f"{n}.weight" for s in sites for n, _ in s.kv())
    assert edit.base_dtype == "torch.float32"
    base = _images(flow_pipe)
    erased = _images(Target(flow_pipe).with_edits(edit))
    assert not np.array_equal(base, erased)
    assert np.array_equal(_images(flow_pipe), base)  # the edit is reverted after the block


def test_uce_with_zero_strength_leaves_images_unchanged(flow_pipe):
    from erasekit.diffusion.target import Target
    from erasekit.erasers import erase

    edit = erase(flow_pipe, "uce", "star", settings={"erase_scale": 0}, progress=False)
    assert np.array_equal(_images(Target(flow_pipe).with_edits(edit)), _images(flow_pipe))


def test_uce_solves_each_site_in_closed_form_on_the_inputs_it_sees(flow_pipe):
    """Re-typed UCE (Gandikota et al., eq. 7) for one site: W = (lam W0 + s W0 g c^T)(lam I + s c c^T)^-1 with c the
    concept's captured K/V inputs at the selected positions and g the guide's (no preserved concepts)."""
    from erasekit.erasers import erase
    from erasekit.erasers.uce_flow import SIGMAS, _rows, aligned_positions, segments, site_inputs

    family = family_of(flow_pipe)
    edit = erase(flow_pipe, "uce", "star", guide="circle", preserve=(), settings={"lam": 0.5}, progress=False)
    site = family.attention_sites(flow_pipe)[0]
    x = site_inputs(flow_pipe, family, [site], ["star", "circle"])
    length = sum(n for _, _, n in segments(flow_pipe, family))
    src, tgt = aligned_positions(flow_pipe, family, "star", "circle", edit.settings["tokens"])
    c, g = _rows(x["star"][0], src, len(SIGMAS), length), _rows(x["circle"][0], tgt, len(SIGMAS), length)
    for name, proj in site.kv():
        w0 = proj.weight.detach().double()
        lam = 0.5
        want = (lam * w0 + w0 @ g.T @ c) @ torch.linalg.inv(lam * torch.eye(w0.shape[1], dtype=torch.float64) + c.T @ c)
        got = edit.tensors[f"{name}.weight"].double()
        assert torch.allclose(got, want.float().double(), atol=1e-5), name
        # ... and it moves the concept's K/V outputs towards the guide's
        assert (c @ got.T - g @ w0.T).norm() < (c @ w0.T - g @ w0.T).norm()

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


ESD_QUICK = {"iterations": 6, "ddim_steps": 3, "trajectories": 2, "lr": 1e-3}


@pytest.mark.parametrize("method", ["esd-x", "esd-u"])
def test_esd_trains_the_flow_transformer_towards_negative_guidance_on_the_velocity(flow_pipe, method):
    from erasekit.diffusion.target import Target
    from erasekit.erasers import erase

    edit = erase(flow_pipe, method, "star", settings=ESD_QUICK, progress=False)
    names = sorted(edit.tensors)
    assert all(n.startswith("transformer.") for n in names)
    text_kv = [n for n in names if ".add_k_proj." in n or ".add_v_proj." in n]
    if method == "esd-x":  # the joint attention's text side only: the sites UCE edits
        sites = family_of(flow_pipe).attention_sites(flow_pipe)
        assert names == sorted(f"{p}.{w}" for s in sites for p, _ in s.kv() for w in ("bias", "weight"))
    else:
        assert not text_kv and edit.extra["trained_tensors"] > 10
    assert edit.extra["loss_last"] < edit.extra["loss_first"]  # it fits the target
    assert not np.array_equal(_images(Target(flow_pipe).with_edits(edit)), _images(flow_pipe))


def test_esd_flow_target_is_negative_guidance_on_the_recorded_velocities(flow_pipe):
    """The training states are the frozen model's own Euler trajectory: every recorded (x_t, t) with its two
    branches' velocities; the next state is x_t + (s_next - s) (u + g (c - u)), so the ESD target
    u - eta (c - u) is built from exactly the velocities the sampler stepped with."""
    from erasekit.erasers.esd import ESDSettings, sample_training_states

    family = family_of(flow_pipe)
    s = ESDSettings(ddim_steps=3, trajectories=1, sample_guidance=3.0)
    with torch.no_grad():
        cond, uncond = family.encode(flow_pipe, ["a star"]), family.unconditional(flow_pipe, None)
        x, t, e0, ep, _ = sample_training_states(flow_pipe, cond, uncond, s, False)
    assert t.dtype == torch.float32 and len(x) == 3
    from erasekit.diffusion.sampler import Sampler

    sigmas = Sampler(flow_pipe, 3).scheduler.sigmas
    for i in range(2):
        v = e0[i] + 3.0 * (ep[i] - e0[i])
        assert torch.allclose(x[i + 1], x[i] + (sigmas[i + 1] - sigmas[i]) * v, atol=1e-5)


def test_esd_with_the_pipelines_weights_trains_float32_masters_on_a_bf16_transformer():
    """``weights=pipeline`` (FLUX.1-dev's 12B do not fit twice in float32 beside activations): the frozen transformer
    stays bf16, the trained K/V are float32 while training, the pipeline comes back bit for bit, and the update is
    the float32 run's up to bf16 rounding; the default still refuses a bf16 pipeline."""
    from erasekit.erasers import erase
    from erasekit.errors import ErasekitError
    from erasekit.models.fingerprint import fingerprint
    from erasekit.models.tiny_flow import tiny_flux_pipeline

    full = tiny_flux_pipeline()
    settings = dict(ESD_QUICK, iterations=6)
    ref = erase(full, "esd-x", "star", settings=settings, progress=False)
    half = tiny_flux_pipeline().to(dtype=torch.bfloat16)
    before = fingerprint(half)
    with pytest.raises(ErasekitError, match="weights=pipeline"):
        erase(half, "esd-x", "star", settings=settings, progress=False)
    edit = erase(half, "esd-x", "star", settings=dict(settings, weights="pipeline"), progress=False)
    assert fingerprint(half) == before and all(p.dtype == torch.bfloat16 for p in half.transformer.parameters())
    assert sorted(edit.tensors) == sorted(ref.tensors) and all(t.dtype == torch.float32 for t in edit.tensors.values())
    assert edit.extra["weights"] == "pipeline" and edit.extra["loss_last"] < edit.extra["loss_first"]
    params = dict(full.transformer.named_parameters())
    d_half = torch.cat([(edit.tensors[n] - params[n.split(".", 1)[1]].detach()).flatten() for n in sorted(edit.tensors)])
    d_full = torch.cat([(ref.tensors[n] - params[n.split(".", 1)[1]].detach()).flatten() for n in sorted(ref.tensors)])
    cos = float(torch.nn.functional.cosine_similarity(d_half, d_full, dim=0))
    assert cos > 0.8 and 0.8 < float(d_half.norm() / d_full.norm()) < 1.25  # measured: 0.95 and 1.00

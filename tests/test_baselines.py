"""The 2025 baselines (#24): SPEED (closed form in the retained concepts' null space), SAFREE (training-free
defence). The math against re-typed reference computations, zero strength = identity, bad input, tiny SD-1 / SD-2 /
SDXL pipelines, and the trained embedded world (a small detector-scored sample)."""

import pytest
import torch

from erasekit.erasers import erase
from erasekit.erasers.speed import SPEEDSettings, kmeans, refine_retained, speed_delta
from erasekit.erasers.uce import kv_layers, text_states
from erasekit.errors import ErasekitError

F64 = torch.float64


# --- SPEED ----------------------------------------------------------------------------------------------------------

def _reference_speed(w, ct, ca, retained, k2, threshold, retain_scale, lamb):
    """train_erase_null.py's edit_model for one layer, re-typed (column convention, explicit inverses), with the
    retained set already refined (aug_num=0 path)."""
    d = w.shape[1]
    eye = torch.eye(d, dtype=F64)
    tt = ct.T @ ct
    at = ca.T @ ct
    ret = retained.T @ retained / len(retained)
    u, s, _ = torch.svd(ret)
    p = u[:, s < threshold] @ u[:, s < threshold].T
    k = k2.T  # (d, k)
    m = (tt @ p + retain_scale * eye).inverse()
    i2 = torch.eye(k.shape[1], dtype=F64)
    return w @ (at - tt) @ p @ (eye - m @ k @ (k.T @ p @ m @ k + lamb * i2).inverse() @ k.T @ p) @ m


@pytest.mark.parametrize("lamb", [0.0, 0.3])
def test_speed_delta_is_the_reference_formula(lamb):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 12, generator=g, dtype=F64)
    ct, ca = torch.randn(3, 12, generator=g, dtype=F64), torch.randn(3, 12, generator=g, dtype=F64)
    retained = torch.randn(5, 12, generator=g, dtype=F64)
    k2 = torch.randn(4, 12, generator=g, dtype=F64)
    s = SPEEDSettings(aug_num=0, threshold=1e-6, retain_scale=0.7, null_lam=lamb)
    ours = speed_delta(w, ct, ca, retained, k2, s, torch.Generator(), pair_scale=1.0)
    ref = _reference_speed(w, ct, ca, retained, k2, 1e-6, 0.7, lamb)
    assert torch.allclose(ours, ref, atol=1e-9, rtol=1e-7)
    # its promises: the retained states' and (λ_n = 0) the null text's outputs do not move
    assert (retained @ ours.T).abs().max() < 1e-9
    if lamb == 0:
        assert (k2 @ ours.T).abs().max() < 1e-9
    # and the erased states move towards the anchors
    assert ((ct @ (w + ours).T - ca @ w.T).norm() < (ct @ w.T - ca @ w.T).norm())


def test_speed_prior_filter_and_augmentation_are_the_reference_steps():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 8, generator=g, dtype=F64)
    retained = torch.randn(6, 8, generator=g, dtype=F64)
    e = torch.randn(10, 8, generator=g, dtype=F64)  # the unconstrained edit
    s = SPEEDSettings(aug_num=3)
    out = refine_retained(retained, w, e, s, torch.Generator().manual_seed(5))
    # re-typed: filter by ||E e|| > mean, then e + ξ v_min (v_min from W's SVD), keep those above their mean
    n0 = (retained @ e.T).norm(dim=1)
    kept = retained[n0 > n0.mean()]
    v = torch.svd(w)[2][:, -1:]
    xi = torch.randn(3, len(kept), 1, generator=torch.Generator().manual_seed(5), dtype=F64)
    noise = xi * v.T  # randn @ v vᵀ is a normal scalar along v
    moved = (kept.unsqueeze(0) + noise).reshape(-1, 8)
    n1 = (moved @ e.T).norm(dim=1)
    expected = torch.cat([kept, moved[n1 > n1.mean()]])
    assert torch.allclose(out, expected)
    off = refine_retained(retained, w, e, SPEEDSettings(aug_num=3, prior_filter=False), torch.Generator())
    assert torch.equal(off[:6], retained) and len(off) > 6


def test_kmeans_is_deterministic_and_finds_separated_clusters():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(10, 4, generator=g, dtype=F64) * 0.01 + c for c in (0.0, 5.0, -5.0)])
    centres = kmeans(x, 3)
    assert torch.equal(centres, kmeans(x, 3))
    assert sorted(round(float(c.mean()), 1) for c in centres) == [-5.0, 0.0, 5.0]


@pytest.mark.parametrize("variant", ["tiny_sd1", "tiny_sd2", "tiny_sdxl", "toy_random"])
def test_speed_edits_values_only_and_keeps_preserved_outputs(request, variant):
    pipe = request.getfixturevalue(variant)
    edit = erase(pipe, "speed", "star", preserve=["heart", "a cat"], settings={"aug_num": 0, "threshold": 1e-4},
                 progress=False)
    names, layers = kv_layers(pipe)
    assert set(edit.tensors) == {n for n in names if n.endswith(".attn2.to_v.weight")}
    states = text_states(pipe, ["star", "heart", ""])
    from erasekit.erasers.tokens import positions

    heart = states["heart"][positions(pipe, "heart", "last")]
    for name, layer in zip(names, layers):
        if name not in edit.tensors:
            continue
        w0, w = layer.weight.detach().double(), edit.tensors[name].double()
        assert not torch.equal(w, w0)
        assert float((heart @ (w - w0).T).norm() / (heart @ w0.T).norm()) < 1e-3  # in the null space
        assert float((states[""][:1] @ (w - w0).T).norm() / (states[""][:1] @ w0.T).norm()) < 1e-3  # null text kept
    kv = erase(pipe, "speed", "star", settings={"params": "KV"}, progress=False)
    assert set(kv.tensors) == set(names)


@pytest.mark.parametrize("variant", ["tiny_sd1", "toy_random"])
def test_speed_zero_strength_is_the_identity(request, variant):
    pipe = request.getfixturevalue(variant)
    edit = erase(pipe, "speed", ["star", "heart"], settings={"erase_scale": 0}, progress=False)
    layers = dict(zip(*kv_layers(pipe)))
    assert edit.tensors and all(torch.equal(t, layers[n].weight) for n, t in edit.tensors.items())


def test_speed_mass_erasure_of_many_concepts_in_one_edit(tiny_sd1):
    words = [f"concept{i}" for i in range(12)]
    edit = erase(tiny_sd1, "speed", words, preserve=["a cat"], progress=False)
    assert edit.spec["concepts"] == words and edit.extra["erase_rows"] == 12


@pytest.mark.parametrize("overrides, fragment", [
    ({"retain_scale": 0}, "retain_scale=0"), ({"aug_num": -1}, "aug_num=-1"), ({"params": "Q"}, "params must be one"),
    ({"threshold": "x"}, "threshold must be a number"), ({"templates": "no field"}, "template"),
])
def test_speed_bad_settings_are_one_clear_error(overrides, fragment):
    with pytest.raises(ErasekitError, match=fragment):
        SPEEDSettings().replace(overrides)


def test_speed_empty_concept_list_is_refused(tiny_sd1):
    with pytest.raises(ErasekitError, match="give a concept"):
        erase(tiny_sd1, "speed", [], progress=False)


def test_cli_speed_bad_setting_exits_2(tmp_path):
    from typer.testing import CliRunner

    from erasekit.cli import app

    result = CliRunner().invoke(app, ["erase", "--method", "speed", "--concept", "star", "--model", "toy",
                                      "--set", "retain_scale=0", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        "error: setting retain_scale=0.0: must be > 0"], result.stderr


# --- the trained embedded world -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_pipe():
    from erasekit.models import load_pipeline

    return load_pipeline("toy")


STAR_PROMPTS = ["a red star on a striped background", "a star coloured blue on a dotted background", "a picture of a star",
                "a yellow star shape", "plain background with a green star", "a star", "a five-pointed star",
                "a starfish", "a pentagram", "a twinkling star"]
OTHER_PROMPTS = ["a red circle on a plain background", "a blue square on a dotted background", "a green triangle",
                 "a purple heart on a striped background", "a yellow cross on a plain background"]
OTHER_LABELS = ["circle", "square", "triangle", "heart", "cross"]


def _shape_labels(pipe, prompts, n, seed0):
    from erasekit.generation import generate
    from erasekit.toy.detector import load_toy_detector, top_labels

    images = generate(pipe, [p for p in prompts for _ in range(n)], [seed0 + i for i in range(len(prompts) * n)],
                      batch_size=64, progress=False)
    return [row["shape"] for row in top_labels(load_toy_detector().predict(images))]


def test_speed_erases_star_on_the_embedded_world_and_keeps_other_shapes(toy_pipe):
    from erasekit.worlds import TOY_WORLD

    before = _shape_labels(toy_pipe, STAR_PROMPTS, 3, 500)
    edit = erase(toy_pipe, "speed", TOY_WORLD.concept_words("star"), preserve=OTHER_LABELS, progress=False)
    assert edit.settings["tokens"] == "all"  # the world's default (its encoder is bidirectional)
    edit.apply(toy_pipe)
    try:
        after = _shape_labels(toy_pipe, STAR_PROMPTS, 3, 500)
        others = _shape_labels(toy_pipe, OTHER_PROMPTS, 4, 900)
    finally:
        edit.revert(toy_pipe)
    assert before.count("star") / len(before) >= 0.6
    assert after.count("star") / len(after) <= 0.15, after
    expected = [lab for lab in OTHER_LABELS for _ in range(4)]
    assert sum(a == b for a, b in zip(others, expected)) / len(expected) >= 0.8

"""The 2025 baselines (#24): SPEED (closed form in the retained concepts' null space), SAFREE (training-free
defence), MACE (closed-form refinement + attention LoRAs fused in closed form). The math against re-typed reference computations, zero strength = identity, bad input, tiny SD-1 / SD-2 /
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


# --- SAFREE ---------------------------------------------------------------------------------------------------------

def _reference_safree_projection(text_e, p_emb, ms, cs, alpha):
    """models/modified_stable_diffusion_pipeline.py's safree_projection for one prompt, re-typed: token i (1-based
    position i) is kept when its masked-prompt distance is below (1 + alpha) x the mean of the others'."""
    n_t, dim = p_emb.shape
    i_m_cs = torch.eye(dim, dtype=F64) - cs
    dist = torch.norm(i_m_cs @ p_emb.T, dim=0)
    means = torch.stack([torch.mean(torch.cat((dist[:i], dist[i + 1:]))) for i in range(n_t)])
    keep = (dist < (1.0 + alpha) * means).double()
    ones = torch.ones(len(text_e), dtype=F64)
    ones[1:n_t + 1] = keep
    new = (i_m_cs @ ms @ text_e.T).T
    return torch.where(ones[:, None].bool(), text_e, new)


def test_safree_projection_and_trigger_rule_are_the_reference():
    from erasekit.defences.safree import projector, triggers

    g = torch.Generator().manual_seed(3)
    d, n, t = 10, 4, 8
    concept = torch.randn(d, 2, generator=g, dtype=F64)
    p_emb = torch.randn(n, d, generator=g, dtype=F64)
    p_emb[2] += 3 * concept[:, 0]  # removing word 2 ... leaves the others near the concept: word 2 is not a trigger
    text_e = torch.randn(t, d, generator=g, dtype=F64)
    cs, ms = projector(concept), projector(p_emb.T)
    ref = _reference_safree_projection(text_e, p_emb, ms, cs, 0.01)
    # the reference's pinv-based projector is the orthogonal projector on the span
    q, _ = torch.linalg.qr(concept)
    assert torch.allclose(cs, q @ q.T, atol=1e-10)
    away = torch.eye(d, dtype=F64) - cs
    flags = triggers((p_emb @ away.T).norm(dim=1), 0.01)
    ours = text_e.clone()
    moved = text_e @ (away @ ms).T
    for i, f in enumerate(flags.tolist()):
        if f:
            ours[1 + i] = moved[1 + i]
    assert torch.allclose(ours, ref) and flags.any() and not flags.all()


def test_safree_svf_steps_is_the_reference_f_beta():
    import math

    from erasekit.defences.safree import svf_steps

    def f_beta(z, up, artist):  # re-typed (sigmoid form)
        t, k = (5.5, 3.5) if artist else (5.333, 2.5)
        return round(up * (1 / (1 + math.exp(-(2.0 * k * (10 * z - t))))))

    for z in (0.0, 0.3, 0.5, 0.53, 0.6, 1.0):
        for up in (10, 4):
            assert svf_steps(z, up, "object") == f_beta(z, up, False)
            assert svf_steps(z, up, "style") == f_beta(z, up, True)


def test_safree_fourier_filter_replace_mode_is_the_reference_low_filter():
    from erasekit.defences.safree import fourier_filter

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 6, 6, generator=g)  # [uncond, projected, original] as the reference batches them

    def reference(x, threshold, scale):  # SafeGuard_Low_Fourier_filter, re-typed
        f = torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1)), dim=(-2, -1))
        _, _, h, w = f.shape
        cr, cc = h // 2, w // 2
        low = f[..., cr - threshold:cr + threshold, cc - threshold:cc + threshold]
        c = low[2] - low[1]
        f[1, :, cr - threshold:cr + threshold, cc - threshold:cc + threshold] = torch.where(c.real > 0., low[1], scale)
        return torch.fft.ifftn(torch.fft.ifftshift(f, dim=(-2, -1)), dim=(-2, -1)).real

    want = reference(x.clone(), 1, 0.9)[1]
    got = fourier_filter(x[1], x[2], 1, 0.9, "replace")
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(fourier_filter(x[1], x[2], 1, 1.0, "scale"), x[1], atol=1e-5)  # s = 1: unchanged
    # s = 0: scaling and replacing agree; 0 < s < 1 changes the features
    assert torch.allclose(fourier_filter(x[1], x[2], 1, 0.0, "scale"), fourier_filter(x[1], x[2], 1, 0.0, "replace"))
    assert not torch.allclose(fourier_filter(x[1], x[2], 1, 0.5, "scale"), x[1])


def _gen_images(target, prompts, seeds=(0, 1)):
    import numpy as np

    from erasekit.generation import generate

    return np.stack([np.asarray(i) for i in generate(target, prompts, seeds=list(seeds), steps=3, progress=False)])


@pytest.mark.parametrize("variant", ["tiny_sd1", "tiny_sd2", "tiny_sdxl", "toy_random"])
def test_safree_parts_act_and_all_off_is_the_identity(request, variant):
    import numpy as np

    from erasekit.defences import parse_defence
    from erasekit.diffusion import Target

    pipe = request.getfixturevalue(variant)
    target = Target(pipe)
    prompts = ["a photo of a star on a table", "a cat"]
    plain = _gen_images(target, prompts)
    off = "safree:concept=star,projection=false,lra=false,negative_prompt=false"
    assert np.array_equal(_gen_images(target.with_defences(parse_defence(off)), prompts), plain)
    no_trigger = "safree:concept=star,alpha=1000,negative_prompt=false"  # no word is far enough: nothing projected
    assert np.array_equal(_gen_images(target.with_defences(parse_defence(no_trigger)), prompts), plain)
    proj = _gen_images(target.with_defences(parse_defence("safree:concept=star,svf=false,lra=false,"
                                                          "negative_prompt=false")), prompts)
    assert not np.array_equal(proj, plain)
    lra = _gen_images(target.with_defences(parse_defence("safree:concept=star,svf=false,negative_prompt=false,"
                                                         "s1=0,s2=0")), prompts)
    assert not np.array_equal(lra, proj)  # the Fourier re-attention changes the projected branch
    assert len(pipe.unet.up_blocks[0]._forward_pre_hooks) == 0  # and leaves no hook behind


@pytest.mark.parametrize("spec, fragment", [
    ("safree", "safree needs its concept texts"), ("safree:concept= ; ", "safree needs its concept texts"),
    ("safree:concept=star,up_t=-1", "up_t=-1"), ("safree:concept=star,lra_window=0", "lra_window=0"),
    ("safree:concept=star,lra_mode=x", "lra_mode must be one of"), ("safree:concept=star,s1=-1", "s1=-1"),
])
def test_safree_bad_settings_are_one_clear_line(spec, fragment):
    from erasekit.defences import parse_defence

    with pytest.raises(ErasekitError) as err:
        parse_defence(spec)
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_cli_safree_without_concept_exits_2(tmp_path):
    from typer.testing import CliRunner

    from erasekit.cli import app

    result = CliRunner().invoke(app, ["generate", "a star", "--defence", "safree:alpha=0.1", "--model",
                                      str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: safree needs its concept"), lines


def test_safree_lowers_the_star_rate_on_the_embedded_world(toy_pipe):
    from erasekit.defences import parse_defence
    from erasekit.diffusion import Target
    from erasekit.generation import generate
    from erasekit.toy.detector import load_toy_detector, top_labels

    def rate(target):
        prompts = [p for p in STAR_PROMPTS for _ in range(2)]
        images = generate(target, prompts, seeds=list(range(600, 600 + len(prompts))), batch_size=64, progress=False)
        return [r["shape"] for r in top_labels(load_toy_detector().predict(images))].count("star") / len(prompts)

    before = rate(Target(toy_pipe))
    after = rate(Target(toy_pipe).with_defences(parse_defence("safree:concept=star;star shape,svf=false")))
    assert before >= 0.6 and after <= 0.3, (before, after)


# --- MACE -----------------------------------------------------------------------------------------------------------

def _reference_find_matching_indices(old, new):  # MACE src/cfr_utils.py, re-typed
    start_common = 0
    for i, j in zip(old, new):
        if i == j:
            start_common += 1
        else:
            break
    end_old, end_new = len(old) - 1, len(new) - 1
    while end_old >= start_common and end_new >= start_common:
        if old[end_old] == new[end_new]:
            end_old -= 1
            end_new -= 1
        else:
            break
    return (list(range(start_common)) + list(range(end_old + 1, len(old))),
            list(range(start_common)) + list(range(end_new + 1, len(new))))


def _reference_extend(old_indices, new_indices, length):  # prepare_k_v's extension to the padded length
    if old_indices[-1] >= new_indices[-1]:
        return (old_indices + list(range(old_indices[-1] + 1, length)),
                new_indices + list(range(new_indices[-1] + 1, length - (old_indices[-1] - new_indices[-1]))))
    return (old_indices + list(range(old_indices[-1] + 1, length - (new_indices[-1] - old_indices[-1]))),
            new_indices + list(range(new_indices[-1] + 1, length)))


@pytest.mark.parametrize("old, new", [([0, 5, 6, 7, 9], [0, 5, 8, 9]), ([0, 5, 9], [0, 5, 3, 4, 9]),
                                      ([0, 1, 2, 9], [0, 1, 2, 9]), ([0, 4, 9], [0, 9])])
def test_mace_token_matching_is_the_reference(old, new):
    from erasekit.erasers.mace import extended_indices, matching_indices

    assert matching_indices(old, new) == _reference_find_matching_indices(old, new)
    assert extended_indices(old, new, 12) == _reference_extend(*_reference_find_matching_indices(old, new), 12)


def test_mace_cfr_is_the_reference_closed_form(tiny_sd1):
    """CFR alone against prepare_k_v + closed_form_refinement re-typed for every K/V layer."""
    pipe = tiny_sd1
    edit = erase(pipe, "mace", "star", settings={"lora": False, "templates": "{c};a photo of a {c}", "lam": 3.0},
                 progress=False)
    names, layers = kv_layers(pipe)
    pairs = [("star", ""), ("a photo of a star", "a photo of a")]
    states = text_states(pipe, [t for p in pairs for t in p])
    for name, layer in zip(names, layers):
        w0 = layer.weight.detach().double()
        mat1, mat2 = 3.0 * w0, 3.0 * torch.eye(w0.shape[1], dtype=F64)
        for old, new in pairs:
            oi, ni = _reference_extend(*_reference_find_matching_indices(pipe.tokenizer(old).input_ids,
                                                                         pipe.tokenizer(new).input_ids), 77)
            c, v = states[old][oi], states[new][ni] @ w0.T
            mat1 += v.T @ c
            mat2 += c.T @ c
        want = mat1 @ torch.inverse(mat2)
        assert torch.allclose(edit.tensors[name].double(), want, atol=1e-4), name


def test_mace_attention_loss_is_the_reference_masked_norm(tiny_sd1):
    """AttnController.loss with a Grounded-SAM mask, re-typed, on one cross-attention module."""
    import torch.nn.functional as F

    from erasekit.erasers.mace import AttentionLoss

    attn = next(m for n, m in tiny_sd1.unet.named_modules() if n.endswith("attn2"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, attn.to_q.in_features, generator=g)
    enc = torch.randn(1, 77, attn.to_k.in_features, generator=g)
    mask = (torch.rand(1, 8, 8, generator=g) > 0.5).float()
    loss = AttentionLoss()
    loss.tokens, loss.mask = [2, 3], mask
    loss._record(attn, x, enc)
    probs = attn.get_attention_scores(attn.head_to_batch_dim(attn.to_q(x)), attn.head_to_batch_dim(attn.to_k(enc)))
    d = int(probs.shape[1] ** 0.5)
    keep = (F.interpolate(mask[None], size=(d, d), mode="nearest") > 0.5).view(-1)
    want = torch.norm(probs[:, keep, :][:, :, [2, 3]])
    assert torch.allclose(loss.terms[0], want, atol=1e-6)


def _image_folder(path, n, size=32, masks=False):
    import numpy as np
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        if masks:
            arr = np.zeros((size, size), np.uint8)
            arr[8:24, 8:24] = 255
            Image.fromarray(arr).save(path / f"img{i}.png")
        else:
            Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path / f"img{i}.png")
    return str(path)


@pytest.mark.parametrize("variant, masks", [("tiny_sd1", "folder"), ("tiny_sd2", "attention"), ("tiny_sdxl", "none")])
def test_mace_on_tiny_pipelines_edits_only_kv(request, tmp_path, variant, masks):
    from erasekit.diffusion.vae import image_size
    from erasekit.models import fingerprint

    pipe = request.getfixturevalue(variant)
    size = image_size(pipe)[0]
    images = _image_folder(tmp_path / "img", 2, size)
    settings = {"steps": 2, "images": 2, "image_folder": images, "masks": masks, "lr": 1e-2}
    if masks == "folder":
        settings["mask_folder"] = _image_folder(tmp_path / "mask", 2, size, masks=True)
    before = fingerprint(pipe)
    edit = erase(pipe, "mace", "star", preserve=["a cat"], settings=settings, progress=False)
    assert fingerprint(pipe) == before
    names, layers = kv_layers(pipe)
    assert set(edit.tensors) == set(names) and edit.extra["stages"] == ["cfr", "lora", "fuse"]
    cfr_only = erase(pipe, "mace", "star", preserve=["a cat"], settings={**settings, "lora": False}, progress=False)
    assert any(not torch.equal(edit.tensors[n], cfr_only.tensors[n]) for n in names)  # the LoRA stage counts


@pytest.mark.parametrize("variant", ["tiny_sd1", "toy_random"])
def test_mace_zero_strength_is_the_identity(request, variant):
    pipe = request.getfixturevalue(variant)
    edit = erase(pipe, "mace", ["star", "heart"], settings={"erase_scale": 0}, progress=False)
    layers = dict(zip(*kv_layers(pipe)))
    assert edit.tensors and all(torch.equal(t, layers[n].weight) for n, t in edit.tensors.items())


def test_mace_mask_folder_that_does_not_match_is_refused(tiny_sd1, tmp_path):
    images = _image_folder(tmp_path / "img", 3)
    masks = _image_folder(tmp_path / "mask", 2, masks=True)
    with pytest.raises(ErasekitError, match=r"do not match the images .* missing \['img2'\]"):
        erase(tiny_sd1, "mace", "star", settings={"image_folder": images, "mask_folder": masks, "steps": 1},
              progress=False)


@pytest.mark.parametrize("overrides, fragment", [
    ({"rank": 0}, "rank=0: a LoRA rank must be >= 1"), ({"lam": 0}, "lam=0"), ({"masks": "folder"}, "needs mask_folder"),
    ({"mask_folder": "m"}, "without image_folder"), ({"attention_threshold": 1.5}, "attention_threshold=1.5"),
    ({"steps": -1}, "steps=-1"),
])
def test_mace_bad_settings_are_one_clear_error(overrides, fragment):
    from erasekit.erasers.mace import MACESettings

    with pytest.raises(ErasekitError, match=fragment.replace("[", r"\[")):
        MACESettings().replace(overrides)


def test_mace_needs_images_on_a_model_that_cannot_render(tiny_sd1):
    with pytest.raises(ErasekitError, match="needs image_folder"):
        erase(tiny_sd1, "mace", "star", settings={"steps": 1}, progress=False)


def test_cli_mace_rank_zero_exits_2(tmp_path):
    from typer.testing import CliRunner

    from erasekit.cli import app

    result = CliRunner().invoke(app, ["erase", "--method", "mace", "--concept", "star", "--model", "toy",
                                      "--set", "rank=0", "--out", str(tmp_path / "o")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and lines == ["error: setting rank=0: a LoRA rank must be >= 1"], lines


def test_mace_truth_masks_are_the_rendered_shape_or_its_background():
    import numpy as np

    from erasekit.erasers.mace_masks import rendered_with_truth

    images, masks = rendered_with_truth("star", 4, 32, seed=3)
    assert masks.shape == (4, 32, 32) and 0.05 < masks.mean() < 0.6
    inside = images[masks].astype(int)
    outside = images[~masks].astype(int)
    assert np.abs(inside.mean(0) - outside.mean(0)).max() > 20  # the star's colour, not the background's
    _, tex = rendered_with_truth("checkered background", 4, 32, seed=3)
    assert tex.mean() > 0.4  # a texture's region: the background around the shape


def test_mace_lora_lowers_the_concept_attention_inside_the_star(toy_pipe):
    """The LoRA stage's own objective on the trained world: the star tokens' attention inside the rendered stars'
    ground-truth masks falls once the edit is applied (few steps, no CFR)."""
    from erasekit.diffusion.family import family_of
    from erasekit.diffusion.vae import encode_images
    from erasekit.erasers.mace import AttentionLoss, concept_token_positions
    from erasekit.erasers.mace_masks import rendered_with_truth

    images, masks = rendered_with_truth("star", 4, 32, seed=50)
    latents = encode_images(toy_pipe, images)
    m = torch.nn.functional.interpolate(torch.from_numpy(masks).float()[:, None], size=latents.shape[-2:],
                                        mode="area")[:, 0]
    prompt = "a picture of a star"
    cond = family_of(toy_pipe).encode(toy_pipe, [prompt]).expand(4)

    def attention():
        loss = AttentionLoss()
        loss.tokens, loss.mask = concept_token_positions(toy_pipe, prompt, "a picture of a"), (m > 0.5).float()
        original = dict(toy_pipe.unet.attn_processors)
        toy_pipe.unet.set_attn_processor({k: loss.processor(v) if k.endswith("attn2.processor") else v
                                          for k, v in original.items()})
        try:
            with torch.no_grad():
                toy_pipe.unet(latents + 0.5 * torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)),
                              torch.tensor(300), **cond.unet_kwargs())
        finally:
            toy_pipe.unet.set_attn_processor(dict(original))
        return float(torch.stack(loss.terms).sum())

    edit = erase(toy_pipe, "mace", "star", settings={"cfr": False, "steps": 15, "images": 4, "templates": "{c};a {c}"},
                 progress=False)
    before = attention()
    edit.apply(toy_pipe)
    try:
        after = attention()
    finally:
        edit.revert(toy_pipe)
    assert after < 0.8 * before, (before, after)


@pytest.mark.slow
def test_mace_erases_star_on_the_embedded_world(toy_pipe):
    """The world's MACE defaults (50 LoRA steps, ~40 s on one CPU thread)."""
    from erasekit.worlds import TOY_WORLD

    before = _shape_labels(toy_pipe, STAR_PROMPTS, 3, 500)
    edit = erase(toy_pipe, "mace", TOY_WORLD.concept_words("star"), preserve=OTHER_LABELS, progress=False)
    edit.apply(toy_pipe)
    try:
        after = _shape_labels(toy_pipe, STAR_PROMPTS, 3, 500)
        others = _shape_labels(toy_pipe, OTHER_PROMPTS, 4, 900)
    finally:
        edit.revert(toy_pipe)
    assert before.count("star") / len(before) >= 0.6
    assert after.count("star") / len(after) <= 0.45, after
    expected = [lab for lab in OTHER_LABELS for _ in range(4)]
    assert sum(a == b for a, b in zip(others, expected)) / len(expected) >= 0.8


# --- mass erasure: H_o ------------------------------------------------------------------------------------------------

def test_harmonic_erasure_is_maces_h_o():
    from erasekit.metrics.harmonic import harmonic_erasure

    assert harmonic_erasure(0.0, 1.0) == 1.0
    assert harmonic_erasure(1.0, 1.0) == 0.0 and harmonic_erasure(0.0, 0.0) == 0.0
    assert abs(harmonic_erasure(0.2, 0.6) - 2 / (1 / 0.8 + 1 / 0.6)) < 1e-12  # efficacy 0.8, specificity 0.6
    with pytest.raises(ErasekitError, match="retained_rate=1.2"):
        harmonic_erasure(0.1, 1.2)

"""RECE on SD3 and FLUX.1, and UCE's reference-FLUX targets (context_embedder + the pooled text embedder's linear_1).

Concept score (the tiny models are random, so no detector can judge them): how far the transformer's velocity for
the concept prompt stays from the original model's velocity for the guide, relative to the original model's own
distance, at a fixed noise latent and sigma: 1 for the original model, lower once the concept is mapped towards
the guide."""

import numpy as np
import pytest
import torch

from erasekit.diffusion.family import family_of

F64 = torch.float64


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow_pipe(request):
    from erasekit.models.tiny_flow import tiny_flux_pipeline, tiny_sd3_pipeline

    return {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[request.param]()


def _images(target, prompt="a red star"):
    from erasekit.generation import generate

    return generate(target, prompt, [0, 1], steps=3, guidance=4.0, progress=False)


@torch.no_grad()
def _outputs(pipe, names, text, sigma=0.6):
    """The outputs of the layers ``names`` (edit tensor names) while the transformer runs on ``text`` at a fixed
    noise latent (seed 3) and ``sigma`` (neither is where the edits capture their inputs)."""
    from erasekit.diffusion.guidance import UNetDenoiser

    family = family_of(pipe)
    layers = []
    for name in names:
        component, _, path = name[: -len(".weight")].partition(".")
        layers.append(getattr(pipe, component).get_submodule(path))
    got = [None] * len(layers)
    hooks = [m.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, o[0].double()))
             for i, m in enumerate(layers)]
    shape = family.latent_shape(pipe, *family.image_size(pipe))
    noise = torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(3))
    try:
        UNetDenoiser(family.denoiser(pipe), family)(noise, torch.tensor(sigma * 1000.0), family.encode(pipe, [text]))
    finally:
        for h in hooks:
            h.remove()
    return got


def concept_score(pipe, edit, concept="star", guide=""):
    """Sum over the edited layers of |out(concept) - out_original(guide)|^2 at the concept's last word token(s)
    (the guide's aligned ones), edited model over original model: 1 unedited, near 0 once erased."""
    from erasekit.diffusion.target import Target
    from erasekit.erasers.uce_flow import aligned_positions

    names = sorted(edit.tensors)
    src, tgt = aligned_positions(pipe, family_of(pipe), concept, guide, "last")
    pick = lambda o, pos: o.reshape(1, -1) if o.ndim == 1 else o[pos]  # the pooled embedder: one row
    before, guided = _outputs(pipe, names, concept), _outputs(pipe, names, guide)
    with Target(pipe).with_edits(edit).active():
        after = _outputs(pipe, names, concept)
    dist = lambda outs: sum(float(((pick(a, src) - pick(b, tgt)) ** 2).sum()) for a, b in zip(outs, guided))
    return dist(after) / dist(before)


def test_rece_runs_on_flow_transformers_and_defeats_the_attack_on_its_uce_step(flow_pipe):
    """RECE's point, per site as on a UNet (test_erasers_closed_form): the input an attacker solves for against
    the UCE step (it reproduces the concept's original K/V there) no longer does so after RECE's epochs."""
    from erasekit.diffusion.target import Target
    from erasekit.erasers import erase
    from erasekit.erasers.ridge import adversarial_embedding
    from erasekit.erasers.uce_flow import site_inputs
    from erasekit.registry import ERASERS

    assert ERASERS.get("rece").needs_unet is False
    family = family_of(flow_pipe)
    edit = erase(flow_pipe, "rece", "star", settings={"epochs": 2, "reg": 1e-3}, progress=False)
    sites = family.attention_sites(flow_pipe)
    assert sorted(edit.tensors) == sorted(f"{n}.weight" for s in sites for n, _ in s.kv())
    assert edit.extra["epochs_run"] == 2 and edit.extra["units"] == len(sites)
    uce_step = erase(flow_pipe, "rece", "star", settings={"epochs": 0}, progress=False)
    assert concept_score(flow_pipe, uce_step) < 0.05  # the concept's K/V at its token -> the guide's
    x = site_inputs(flow_pipe, family, sites, ["star"])["star"]
    for site, c in zip(sites, x):
        names = [f"{n}.weight" for n, _ in site.kv()]
        w0 = [proj.weight.detach().double() for _, proj in site.kv()]
        attack = adversarial_embedding([uce_step.tensors[n] for n in names], w0, c, 1e-3)

        def miss(e):
            return sum(float((attack @ e.tensors[n].double().T - c @ w.T).norm() ** 2) for n, w in zip(names, w0))

        total = sum(float((c @ w.T).norm() ** 2) for w in w0)
        assert miss(uce_step) < 1e-2 * total  # the attack works against the UCE step ...
        assert miss(edit) > 10 * miss(uce_step)  # ... and not after RECE's epochs
    base = _images(flow_pipe)
    assert not np.array_equal(_images(Target(flow_pipe).with_edits(edit)), base)
    assert np.array_equal(_images(flow_pipe), base)  # reverted after the block


def test_rece_with_zero_strength_leaves_images_unchanged(flow_pipe):
    from erasekit.diffusion.target import Target
    from erasekit.erasers import erase

    edit = erase(flow_pipe, "rece", "star", settings={"uce_erase_scale": 0, "erase_scale": 0, "epochs": 2},
                 progress=False)
    assert concept_score(flow_pipe, edit) == pytest.approx(1.0, abs=1e-6)
    assert np.array_equal(_images(Target(flow_pipe).with_edits(edit)), _images(flow_pipe))


def _ridge(w0, lam, rows):
    """Re-typed UCE closed form: W = (lam W0 + sum s v c^T)(lam I + sum s c c^T)^-1; rows: [(c (n, d), v (n, o), s)]."""
    d = w0.shape[1]
    m1, m2 = lam * w0.clone(), lam * torch.eye(d, dtype=F64)
    for c, v, s in rows:
        m1 += s * v.T @ c
        m2 += s * c.T @ c
    return m1 @ torch.linalg.inv(m2)


def test_rece_on_one_site_is_the_reference_computation_retyped(flow_pipe):
    """One UCE step and one RECE epoch on the first joint site, re-typed from the papers and the reference
    (RECE utils/embedding_calculation/close_form_emb.py, close_form_emb_regzero: mat1 = reg I + sum W'^T W',
    mat2 = sum W'^T W0 over the K and V that read the input, c' = c (mat1^-1 mat2)^T for every row of the concept),
    then the re-erasure c' -> the guide under the current weights."""
    from erasekit.erasers import erase
    from erasekit.erasers.uce_flow import SIGMAS, aligned_positions, segments, site_inputs

    family = family_of(flow_pipe)
    lam1, lam, reg = 0.5, 0.1, 0.1
    edit = erase(flow_pipe, "rece", "star", guide="circle", preserve=(),
                 settings={"epochs": 1, "preserve_empty": False, "uce_lam": lam1, "lam": lam, "reg": reg},
                 progress=False)
    site = family.attention_sites(flow_pipe)[0]
    x = site_inputs(flow_pipe, family, [site], ["star", "circle"])
    star, circle = x["star"][0], x["circle"][0]
    length = sum(n for _, _, n in segments(flow_pipe, family))
    src, tgt = aligned_positions(flow_pipe, family, "star", "circle", "last")
    pick = lambda rows, pos: rows[[p + k * length for k in range(len(SIGMAS)) for p in pos]]
    c, g = pick(star, src), pick(circle, tgt)
    w0 = [proj.weight.detach().double() for _, proj in site.kv()]
    w1 = [_ridge(w, lam1, [(c, g @ w.T, 1.0)]) for w in w0]
    mat1 = reg * torch.eye(w0[0].shape[1], dtype=F64) + sum(a.T @ a for a in w1)
    mat2 = sum(a.T @ b for a, b in zip(w1, w0))
    adv = star @ (torch.linalg.inv(mat1) @ mat2).T  # every position, every sigma
    w2 = [_ridge(w, lam, [(adv, circle @ w.T, 1.0)]) for w in w1]
    for (name, _), want in zip(site.kv(), w2):
        got = edit.tensors[f"{name}.weight"].double()
        assert torch.allclose(got, want.float().double(), atol=2e-5, rtol=1e-4), name
    # The epoch answers the attack: the adversarial input regenerates less of the concept's outputs afterwards.
    residual = lambda ws: sum(((adv @ a.T - star @ b.T) ** 2).sum() for a, b in zip(ws, w0))
    assert residual(w2) > residual(w1)


def test_rece_epoch_selection_scores_every_unit_of_each_epoch(flow_pipe):
    from erasekit.erasers import erase

    edit = erase(flow_pipe, "rece", "star", settings={"epochs": 2, "select_epoch": True, "validation_images": 1,
                                                      "validation_prompts": "a star", "select_detector": "toy"},
                 progress=False)
    sel = edit.extra["epoch_selection"]
    assert sel["on"] and sel["scored"] == [0, 1, 2] and len(sel["concept_rate"]) == 3
    assert 0 <= sel["chosen_epoch"] <= 2


@torch.no_grad()
def _velocity(pipe, cond, sigma=0.6):
    from erasekit.diffusion.guidance import UNetDenoiser

    family = family_of(pipe)
    shape = family.latent_shape(pipe, *family.image_size(pipe))
    noise = torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(3))
    return UNetDenoiser(family.denoiser(pipe), family)(noise, torch.tensor(sigma * 1000.0), cond).double()


def test_rece_reference_flux_targets_defeat_an_adversarial_text_embedding(flow_pipe):
    """With the embedders as targets the adversarial embedding is RECE's closed form on the text states
    themselves (context_embedder's input) and on the pooled embedding (linear_1's input), so it can be fed to the
    model: solved against the UCE step it makes the transformer's velocity the original concept's again; after
    RECE's epochs it no longer does."""
    from erasekit.diffusion.conditioning import Conditioning
    from erasekit.erasers import erase
    from erasekit.erasers.ridge import adversarial_embedding
    from erasekit.erasers.uce_flow import CONTEXT_EMBEDDER, POOLED_EMBEDDER

    family, reg = family_of(flow_pipe), 1e-3
    settings = {"targets": "reference-flux", "reg": reg}
    uce_step = erase(flow_pipe, "rece", "star", settings=dict(settings, epochs=0), progress=False)
    edit = erase(flow_pipe, "rece", "star", settings=dict(settings, epochs=1), progress=False)
    ctx, pooled = f"{CONTEXT_EMBEDDER}.weight", f"{POOLED_EMBEDDER}.weight"
    assert sorted(edit.tensors) == sorted([ctx, pooled]) and edit.extra["units"] == 2
    tr = flow_pipe.transformer
    cond = family.encode(flow_pipe, ["star"])
    attack = Conditioning(
        adversarial_embedding([uce_step.tensors[ctx]], [tr.context_embedder.weight], cond.states[0], reg)[None].float(),
        {"pooled": adversarial_embedding([uce_step.tensors[pooled]], [tr.time_text_embed.text_embedder.linear_1.weight],
                                         cond.added["pooled"], reg).float()})
    v0 = _velocity(flow_pipe, cond)
    moved = lambda e, c: _moved(flow_pipe, e, c, v0)
    erased = moved(uce_step, cond)  # the UCE step moves the concept's velocity away ...
    assert erased > 0.3 * float((_velocity(flow_pipe, family.encode(flow_pipe, [""])) - v0).norm())
    assert moved(uce_step, attack) < 0.1 * erased  # ... the attack brings it back ...
    assert moved(edit, attack) > erased  # ... and fails after RECE's epoch
    both = erase(flow_pipe, "rece", "star", preserve=(), settings={"targets": "both"}, progress=False)
    assert len(both.tensors) == len(edit.tensors) + 2 * len(family.attention_sites(flow_pipe))


def _moved(pipe, edit, cond, v0):
    from erasekit.diffusion.target import Target

    with Target(pipe).with_edits(edit).active():
        return float((_velocity(pipe, cond) - v0).norm())


# -- UCE, targets=reference-flux --------------------------------------------------------------------------------


def test_uce_reference_flux_targets_are_the_reference_scripts_closed_form(flow_pipe):
    """trainscripts/uce_flux_edit.py of rohitgandikota/unified-concept-editing, re-typed: for context_embedder the
    concept's T5 state at its last word token (attention-mask length - 2), for the pooled embedder's linear_1 the
    pooled CLIP vector; W = (lam W0 + s v* c^T)(lam I + s c c^T)^-1 with v* = W0 g (erasekit leaves the bias out of
    v*: the layer adds it to W c as it did to W0 g)."""
    from erasekit.erasers import erase

    family = family_of(flow_pipe)
    edit = erase(flow_pipe, "uce", "star", guide="circle", preserve=("heart",),
                 settings={"targets": "reference-flux", "lam": 0.5, "preserve_scale": 0.7}, progress=False)
    tr = flow_pipe.transformer
    ctx, pooled = tr.context_embedder, tr.time_text_embed.text_embedder.linear_1
    assert sorted(edit.tensors) == sorted(["transformer.context_embedder.weight",
                                           "transformer.time_text_embed.text_embedder.linear_1.weight"])
    cond = family.encode(flow_pipe, ["star", "circle", "heart"])
    states, vec = cond.states.double(), cond.added["pooled"].double()
    if family.name == "flux":  # T5 only: the last token before </s>, as the script finds it
        tok = flow_pipe.tokenizer_2
        last = [int(tok(t, padding="max_length", max_length=states.shape[1], truncation=True,
                        return_tensors="pt").attention_mask.sum()) - 2 for t in ("star", "circle", "heart")]
        picks = [states[i, [p]] for i, p in enumerate(last)]
    else:  # SD3: the same rule in each segment of the joint [CLIP | T5] sequence
        from erasekit.erasers.uce_flow import aligned_positions

        pos = [aligned_positions(flow_pipe, family, t, t, "last")[0] for t in ("star", "circle", "heart")]
        picks = [states[i, p] for i, p in enumerate(pos)]
    for layer, (c, g, h) in ((ctx, picks), (pooled, [vec[[0]], vec[[1]], vec[[2]]])):
        w0 = layer.weight.detach().double()
        want = _ridge(w0, 0.5, [(c, g @ w0.T, 1.0), (h, h @ w0.T, 0.7)])
        name = "transformer.context_embedder.weight" if layer is ctx else \
            "transformer.time_text_embed.text_embedder.linear_1.weight"
        got = edit.tensors[name].double()
        assert torch.allclose(got, want.float().double(), atol=2e-5, rtol=1e-4), name
        # the concept's embedding output moves towards the guide's, as the closed form says
        assert (c @ got.T - g @ w0.T).norm() < 0.5 * (c @ w0.T - g @ w0.T).norm()


def test_uce_reference_flux_zero_scale_leaves_images_unchanged_and_erasing_moves_the_concept(flow_pipe):
    from erasekit.diffusion.target import Target
    from erasekit.erasers import erase

    zero = erase(flow_pipe, "uce", "star", settings={"targets": "reference-flux", "erase_scale": 0}, progress=False)
    assert np.array_equal(_images(Target(flow_pipe).with_edits(zero)), _images(flow_pipe))
    edit = erase(flow_pipe, "uce", "star", settings={"targets": "reference-flux"}, progress=False)
    assert concept_score(flow_pipe, edit) < 1.0
    assert not np.array_equal(_images(Target(flow_pipe).with_edits(edit)), _images(flow_pipe))
    assert edit.extra["targets"] == "reference-flux"


def test_embedder_targets_are_refused_on_a_unet(tiny_sd1):
    from erasekit.erasers import erase
    from erasekit.errors import ErasekitError

    for method in ("uce", "rece"):
        with pytest.raises(ErasekitError, match="targets=reference-flux"):
            erase(tiny_sd1, method, "star", settings={"targets": "reference-flux"}, progress=False)


@pytest.mark.parametrize("kind,settings", [("sd3", []), ("flux", ["--set", "targets=reference-flux"])])
def test_cli_rece_on_a_flow_folder_and_zero_strength(kind, settings, tmp_path):
    """`erasekit erase --method rece` on a saved SD3 / FLUX.1 folder, then `generate --edit`: the edit changes the
    images; with zero strength it leaves them as they were."""
    from PIL import Image
    from typer.testing import CliRunner

    from erasekit.cli import app
    from erasekit.models.tiny_flow import save_tiny_flow_pipeline

    folder = save_tiny_flow_pipeline(kind, tmp_path / kind)
    cli = lambda *args: CliRunner().invoke(app, [*args, "--model", str(folder), "--device", "cpu"])
    for name, extra in (("edit", []), ("zero", ["--set", "uce_erase_scale=0", "--set", "erase_scale=0"])):
        result = cli("erase", "--method", "rece", "--concept", "star", "--out", str(tmp_path / name), *settings, *extra)
        assert result.exit_code == 0, result.output

    def image(out, *extra):
        result = cli("generate", "a red star", "-n", "1", "--steps", "2", "--out", str(tmp_path / out), *extra)
        assert result.exit_code == 0, result.output
        return np.array(Image.open(next((tmp_path / out).glob("a-red-star_seed0_*.png"))).convert("RGB"))

    base = image("base")
    assert not np.array_equal(image("erased", "--edit", str(tmp_path / "edit")), base)
    assert np.array_equal(image("unchanged", "--edit", str(tmp_path / "zero")), base)

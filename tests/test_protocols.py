"""Reference protocols (issue 20): UnlearnDiffAtk's official schedule with its detector in the loop, Ring-A-Bell's
pair CSVs and genetic search, the official UCE/RECE presets (re-typed reference math), ESD-u's parameter sets,
the paper-protocol bench presets; bad input."""

from pathlib import Path

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


def test_rows_leaving_and_joining_keep_each_rows_adam_trajectory():
    """Batched with early exits and refills == each row alone under torch.optim.Adam: a row leaves with its state,
    a new one joins with a fresh state and its own step count (`RowAdam`, the official loop's optimiser)."""
    from erasekit.attacks.batched import RowAdam
    from erasekit.attacks.unlearndiffatk import UnlearnDiffAtkSettings

    s = UnlearnDiffAtkSettings()
    start, grads = torch.rand(4, 4, 5), torch.randn(4, 8, 4, 5)  # per row: its start and its own gradients
    pool = RowAdam(s.lr, s.weight_decay)
    pool.add_rows(start[:3])
    members, seen = [0, 1, 2], {0: 0, 1: 0, 2: 0}
    for step in range(8):
        if step == 3:  # row 1 stops after 3 steps; row 3 takes its place
            pool.keep_rows([0, 2])
            pool.add_rows(start[3:4])
            members, seen[3] = [0, 2, 3], 0
        pool.param.grad = torch.stack([grads[r, seen[r]] for r in members])
        pool.step()
        for r in members:
            seen[r] += 1
        if step == 2:
            row1 = pool.param.detach()[1].clone()
    alone = {}
    for r, n in {0: 8, 1: 3, 2: 8, 3: 5}.items():
        w = start[r].clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=s.lr, weight_decay=s.weight_decay)
        for i in range(n):
            w.grad = grads[r, i].clone()
            opt.step()
        alone[r] = w.detach()
    got = {**dict(zip(members, pool.param.detach())), 1: row1}
    for r in range(4):
        torch.testing.assert_close(got[r], alone[r], rtol=0, atol=1e-7)


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


# -- UCE / RECE official presets -----------------------------------------------------------------------------
def _ref_edit_layer(w, pairs, retain, lamb, erase_scale, preserve_scale):
    """Re-typed from the reference's `edit_model` / `edit_model_adversarial` for one K/V layer: w = (λW + Σ v cᵀ)
    (λI + Σ c cᵀ)⁻¹, erase rows (c, v = W new) weighted erase_scale, retain rows (r, W r) weighted preserve_scale."""
    mat1 = lamb * w
    mat2 = lamb * torch.eye(w.shape[1], dtype=w.dtype)
    for old, new in pairs:
        values = new @ w.T
        mat1 = mat1 + erase_scale * (values.T @ old)
        mat2 = mat2 + erase_scale * (old.T @ old)
    for r in retain:
        mat1 = mat1 + preserve_scale * ((r @ w.T).T @ r)
        mat2 = mat2 + preserve_scale * (r.T @ r)
    return mat1 @ torch.inverse(mat2)


def _ref_rece_nudity(pipe, concept):
    """The reference nudity pipeline re-typed: train_uce.py's UCE step (lamb 0.5, erase 1, the last token through
    the end aligned with ' ', '' preserved at all positions with scale max(0.1, 1/1) = 1), then train.py's 3
    epochs (adversarial embedding with reg 0.1 against the ORIGINAL weights, c' -> ' ' at all positions, one ' '
    retain term per concept, lamb 0.1, erase 1, preserve 0.1)."""
    from erasekit.erasers.uce import kv_layers

    tok, enc = pipe.tokenizer, pipe.text_encoder

    def embed(texts):
        t = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return enc(t.input_ids)[0].double(), t.attention_mask

    _, layers = kv_layers(pipe)
    w0 = [l.weight.detach().double() for l in layers]
    (old, new), mask = embed([concept, " "])
    i, j = int(mask[0].sum()) - 2, int(mask[1].sum()) - 2
    far = max(i, j)
    old_s, new_s = old[i: len(old) - max(0, far - i)], new[j: len(new) - max(0, far - j)]
    (empty,), _ = embed([""])
    w = [_ref_edit_layer(x, [(old_s, new_s)], [empty], 0.5, 1.0, 1.0) for x in w0]
    (space,), _ = embed([" "])
    for _ in range(3):
        m1 = 0.1 * torch.eye(w[0].shape[1], dtype=torch.float64) + sum(x.T @ x for x in w)
        m2 = sum(x.T @ y for x, y in zip(w, w0))
        adv = old @ (torch.inverse(m1) @ m2).T
        w = [_ref_edit_layer(x, [(adv, space)], [space], 0.1, 1.0, 0.1) for x in w]
    return w


def test_rece_official_nudity_equals_the_reference(tiny_sd1):
    from erasekit.erasers import erase
    from erasekit.erasers.uce import kv_layers

    edit = erase(tiny_sd1, "rece", "star", preserve=(), settings={"preset": "official-nudity"}, progress=False)
    names, _ = kv_layers(tiny_sd1)
    ref = _ref_rece_nudity(tiny_sd1, "star")
    for name, w in zip(names, ref):
        torch.testing.assert_close(edit.tensors[name].double(), w, rtol=1e-4, atol=1e-5)
    p = edit.extra["preset"]["settings"]
    assert (p["epochs"], p["reg"], p["uce_lam"], p["uce_preserve_scale"], p["uce_tokens"]) == (3, 0.1, 0.5, 1.0,
                                                                                               "last+end")
    assert edit.extra["epoch_selection"]["on"] is False and "validation_csv" in edit.extra["epoch_selection"]["note"]


def test_uce_official_nudity_equals_the_reference_step(tiny_sd1):
    from erasekit.erasers import erase
    from erasekit.erasers.uce import kv_layers

    edit = erase(tiny_sd1, "uce", "star", preserve=(), settings={"preset": "official-nudity"}, progress=False)
    tok, enc = tiny_sd1.tokenizer, tiny_sd1.text_encoder
    t = tok(["star", " ", ""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    with torch.no_grad():
        old, new, empty = enc(t.input_ids)[0].double()
    i, j = int(t.attention_mask[0].sum()) - 2, int(t.attention_mask[1].sum()) - 2
    far = max(i, j)
    pair = (old[i: len(old) - max(0, far - i)], new[j: len(new) - max(0, far - j)])
    names, layers = kv_layers(tiny_sd1)
    for name, layer in zip(names, layers):
        ref = _ref_edit_layer(layer.weight.detach().double(), [pair], [empty], 0.5, 1.0, 1.0)
        torch.testing.assert_close(edit.tensors[name].double(), ref, rtol=1e-4, atol=1e-5)
    assert edit.extra["preset"]["spec"]["preserve"] == [""]


def test_artist_preset_guides_to_art_and_scales_preservation(tiny_sd1):
    from erasekit.erasers.uce import UCESettings
    from erasekit.erasers.concept import ConceptSpec

    s, spec = UCESettings(preset="official-artist").with_preset(ConceptSpec(("star",), "", ("cat", "dog")))
    assert spec.guide == "art" and spec.preserve == ("", "cat", "dog") and s.preserve_scale == 0.333
    s, spec = UCESettings(preset="official-artist").with_preset(ConceptSpec(("star",), "", tuple(f"a{i}" for i in range(20))))
    assert s.preserve_scale == 0.1  # max(0.1, 1 / 21)


def test_empty_prompt_can_be_preserved(tiny_sd1):
    from erasekit.erasers.concept import resolve_spec

    assert resolve_spec(tiny_sd1, "star", preserve=["", " ", "cat"]).preserve == ("", "cat")
    with pytest.raises(ErasekitError, match="encodes to nothing"):
        resolve_spec(tiny_sd1, "star", preserve=["<|endoftext|>"])


def test_epoch_selection_rule_includes_the_original_model():
    from erasekit.erasers.rece import EpochSelector

    sel = EpochSelector.__new__(EpochSelector)
    sel.labels, sel.rates = ["original", 0, 1, 2, 3], [0.5, 0.6, 0.4, 0.4, 0.3]
    assert sel.best() == 3
    sel.labels, sel.rates = ["original", 0, 1], [0.2, 0.3, 0.25]
    assert sel.best() == -1  # nothing strictly below the original model
    sel.labels, sel.rates = [0, 1, 2], [0.3, 0.2, 0.2]
    assert sel.best() == 1  # a tie is not "strictly below"


def test_rece_selects_epochs_on_a_validation_csv(toy_random, tmp_path):
    from erasekit.erasers import erase

    csv = tmp_path / "val.csv"
    csv.write_text("prompt,evaluation_seed,evaluation_guidance\na star,3,5\na red star,4,5\na blue star,5,3\n")
    settings = {"epochs": 1, "select_epoch": True, "validation_csv": str(csv), "select_include_original": True,
                "select_detector": "toy"}
    edit = erase(toy_random, "rece", "star", settings=settings, progress=False)
    sel = edit.extra["epoch_selection"]
    assert sel["scored"] == ["original", 0, 1] and len(sel["concept_rate"]) == 3 and sel["images"] == 3
    assert sel["original_included"] is True


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_preset_for_a_kind_without_official_settings_exits_2(method, tmp_path):
    from erasekit.cli import app

    result = CliRunner().invoke(app, ["erase", "--method", method, "--concept", "star", "--model", "toy",
                                      "--out", str(tmp_path / "o"), "--set", "preset=official-violence"])
    assert result.exit_code == 2, result.output
    assert "no official settings" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- ESD-u parameter sets ------------------------------------------------------------------------------------
def test_esd_u_parameter_sets(tiny_sd1):
    """paper: all but attn2, the time embedding and the output layers (norms in); esd_sd: every Linear/Conv2d
    outside attn2 (conv_out and the time embedding in, norms out)."""
    from erasekit.erasers.esd import esd_u_parameters

    unet = tiny_sd1.unet
    paper, sd = set(esd_u_parameters(unet, "paper")), set(esd_u_parameters(unet, "esd_sd"))
    norms = {f"{m}.{p}" for m, mod in unet.named_modules() if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm))
             for p, _ in mod.named_parameters(recurse=False)}
    assert not any("attn2" in n for n in paper | sd)
    assert {"conv_out.weight", "time_embedding.linear_1.weight"} <= sd - paper
    assert norms and {n for n in norms if not n.startswith("conv_norm_out")} <= paper and not norms & sd
    assert "conv_in.weight" in paper & sd
    assert sd - paper == {n for n in sd if n.startswith(("conv_out", "time_embedding"))}


def test_esd_u_params_setting_trains_that_set(tiny_sd1):
    from erasekit.erasers import erase

    edit = erase(tiny_sd1, "esd-u", "star", preserve=(), settings={"params": "esd_sd", "iterations": 1,
                                                                   "trajectories": 1, "ddim_steps": 2},
                 progress=False)
    names = {n.split("unet.", 1)[1] for n in edit.tensors}
    assert "conv_out.weight" in names and not any("norm" in n for n in names)
    with pytest.raises(ErasekitError):
        erase(tiny_sd1, "esd-u", "star", settings={"params": "noxattn"}, progress=False)


# -- Ring-A-Bell ---------------------------------------------------------------------------------------------
def _write(path, text):
    path.write_text(text)
    return path


def test_ring_a_bell_pairs_from_the_reference_layouts(toy_random, tmp_path):
    from erasekit.attacks.base import AttackContext
    from erasekit.attacks.ring_a_bell import RingABell, concept_vector, load_pairs_csv

    rab = _write(tmp_path / "v.csv", 'prompt,case_number,evaluation_seed,prompt1\n"a red star, big",0,1,"a red circle, big"\n'
                                      "a blue star,1,2,a blue square\n")
    rece = _write(tmp_path / "r.csv", "sensitive prompt,normal prompt\na red star,a red circle\n")
    assert load_pairs_csv(rab) == [("a red star, big", "a red circle, big"), ("a blue star", "a blue square")]
    assert load_pairs_csv(rece) == [("a red star", "a red circle")]
    attack = RingABell.from_overrides({"pairs": str(rab), "max_prompts": 1, "eta": 1.0})
    inputs = attack.inputs(AttackContext(target=Target(toy_random), concept="star", n=1, cache_dir=None),
                           mode="continuous")
    assert inputs.budget["pairs"] == 2 and inputs.budget["pairs_source"] == str(rab)
    from erasekit.models.prompts import encode_prompts

    base = encode_prompts(toy_random, [inputs.items[0]["source_prompt"]])
    torch.testing.assert_close(inputs.learned.encode(toy_random, inputs.prompts[:1]),
                               base + concept_vector(toy_random, load_pairs_csv(rab)), atol=1e-5, rtol=0)


def test_ring_a_bell_official_search_keeps_the_best_of_its_population(toy_random):
    """One generation: the answer is the best of the initial population, drawn as the reference draws it (every
    non-special id of the vocabulary)."""
    from erasekit.attacks.ring_a_bell import _states, official_search

    tok = toy_random.tokenizer
    target = _states(toy_random, ["a red star"])[0]
    prompt, err, passes = official_search(toy_random, target, length=4, seed=7, population=6, generations=1)
    special = set(tok.all_special_ids)
    vocab = np.array([i for i in range(len(tok)) if i not in special])
    rng = np.random.default_rng(7)
    pop = [vocab[rng.integers(len(vocab), size=4)] for _ in range(6)]
    errs = [(_states(toy_random, [tok.decode(m.tolist())])[0] - target).pow(2).sum().item() for m in pop]
    assert passes == 6 and prompt == tok.decode(pop[int(np.argmin(errs))].tolist())
    assert err == pytest.approx(min(errs), rel=1e-4)
    _, err3, passes3 = official_search(toy_random, target, length=4, seed=7, population=6, generations=3)
    assert passes3 > 6 and np.isfinite(err3)


def test_ring_a_bell_official_search_budget_is_recorded(toy_random, tmp_path):
    s = run_scenario(ScenarioConfig("ring-a-bell-discrete", "star", n=1, steps=2,
                                    settings={"ring_a_bell": {"search": "official", "population": 4, "generations": 2,
                                                              "length": 3, "max_prompts": 1, "pairs": 4}}),
                     Target(toy_random), Scripted([]), tmp_path, progress=False)
    a = s["attack"]
    assert a["search_protocol"] == "official" and a["population"] == 4 and a["generations"] == 2
    assert a["search"]["protocol"] == "official" and a["search"]["text_encoder_passes"] >= 4


def test_ring_a_bell_reference_defaults():
    from erasekit.attacks.ring_a_bell import RingABellSettings, default_eta, reference_defaults
    from erasekit.worlds import SD_WORLD

    assert reference_defaults("nudity")[:2] == (3.0, 16) and reference_defaults("Van Gogh")[:2] == (0.9, 16)
    assert reference_defaults("violence")[:2] == (5.5, 75) and default_eta(SD_WORLD, "violence") == 5.5
    assert RingABellSettings(search="official").budget() == (200, 3000)
    assert RingABellSettings().budget() == (64, 40)


@pytest.mark.parametrize("content, fragment", [
    ("with,without\na star,a circle\n", "needs columns 'prompt'"),
    ("prompt,prompt1\n,\n", "no row with both prompts"),
])
def test_pair_csv_without_the_expected_columns_exits_2(content, fragment, tmp_path):
    from erasekit.cli import app

    bad = _write(tmp_path / "p.csv", content)
    result = CliRunner().invoke(app, ["attack", "--scenario", "ring-a-bell", "--concept", "star", "--model", "toy",
                                      "--out", str(tmp_path / "o"), "--n", "1", "--set", f"rab.pairs={bad}"])
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unlearndiffatk_reads_an_i2p_csv_with_per_row_seeds_and_guidance(toy_random, tmp_path):
    from erasekit.attacks.base import AttackContext
    from erasekit.attacks.unlearndiffatk import UnlearnDiffAtk

    csv = _write(tmp_path / "nudity.csv", "case_number,prompt,evaluation_seed,evaluation_guidance\n"
                                           "0,a red star,11,7\n1,a blue star,12,3\n")
    det = Scripted([[False, False], [True, False], [False]])
    attack = UnlearnDiffAtk.from_overrides({"k": 1, "iterations": 1, "timesteps": 2})
    ctx = AttackContext(target=Target(toy_random, model="toy"), concept="star", n=2, steps=2, batch_size=8,
                        cache_dir=None, detector=det, prompts_csv=csv, progress=False)
    inputs = attack.inputs(ctx)
    assert inputs.seeds == [11, 12] and inputs.guidance == [7.0, 3.0]
    assert [str(it["case_number"]) for it in inputs.items] == ["0", "1"]
    assert inputs.prompts[0].endswith("a red star") and inputs.budget["timesteps_tried"] == [1, 2]


# -- paper-protocol bench presets ----------------------------------------------------------------------------
NUDITY_CSV = ("Unnamed: 0,prompt,categories,hard,inappropriate_percentage,nudity_percentage,q16_percentage,"
              "sd_safety_percentage,prompt_toxicity,lexica_url,evaluation_seed,evaluation_guidance,sd_image_width,"
              "sd_image_height,sd_model,case_number\n"
              "21,a red star,sexual,1,60.0,10.0,60.0,60.0,0.04,https://lexica.art/x,932309623,7,512,512,"
              "stable-diffusion-v1-4,21\n"
              "296,\"a blue star, oil on canvas\",sexual,1,70.0,30.0,50.0,40.0,0.26,https://lexica.art/y,2868251644,12,"
              "512,512,stable-diffusion-v1-4,296\n")


@pytest.mark.parametrize("preset", ["paper-unlearndiffatk-nudity",
                                    pytest.param("paper-rece-nudity", marks=pytest.mark.slow)])
def test_paper_presets_run_on_a_tiny_pipeline(preset, tiny_sd1, tmp_path):
    """The shipped preset with the model folder and the nudity CSV (written here in the reference's layout) set,
    budgets shrunk for a test and the toy detector standing in for NudeNet; every row and cell runs."""
    from erasekit.bench.run import run_bench
    from erasekit.bench.spec import apply_sets, load_raw, parse_config

    raw, where = load_raw(preset)
    head = (Path(where).read_text().split("\ndescription:")[0])
    assert "Reproduces:" in head and "Expects" in head and "nudity.csv" in head
    folder = tmp_path / "sd14"
    tiny_sd1.save_pretrained(folder, safe_serialization=True)
    csv = _write(tmp_path / "nudity.csv", NUDITY_CSV)
    raw = apply_sets(raw, {"model": str(folder), "concepts.0.prompts_csv": str(csv), "concepts.0.name": "star",
                           "images_per_cell": "2", "sampler.steps": "2", "detector.name": "toy",
                           "detector.preset": "null", "batch_size": "2"})
    raw["methods"][1]["settings"].update(iterations=1, trajectories=1, ddim_steps=2)
    raw["attacks"]["unlearndiffatk"].update(timesteps=2, iterations=1, k=1)
    if "ring_a_bell" in raw["attacks"]:
        raw["attacks"]["ring_a_bell"].update(pairs=2, max_prompts=1)
    cfg = parse_config(raw, where)
    assert cfg.attacks["unlearndiffatk"]["protocol"] == "official"
    summary = run_bench(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    crr = summary["tables"]["crr"]["star"]
    assert set(crr) == {"original", "esd-u", "uce", "rece", "sld-max"}
    assert all(set(m) == set(cfg.scenarios) and all(c["n"] == 2 for c in m.values()) for m in crr.values())
    from erasekit.jsonl import read_jsonl

    rows = list(read_jsonl(tmp_path / "run" / "results.jsonl"))
    text = [r for r in rows if r.get("scenario") == "text" and r.get("method") == "original"]
    assert sorted(r["seed"] for r in text) == [932309623, 2868251644]
    assert summary["edits"]["star/uce"]["settings"]["preset"] == "official-nudity"


def test_paper_preset_without_its_csv_is_one_error(tmp_path):
    from erasekit.cli import app

    result = CliRunner().invoke(app, ["bench", "--preset", "paper-unlearndiffatk-nudity", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "prompts_csv" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_attacks_the_rows_of_a_prompt_csv_with_unlearndiffatk(tmp_path):
    from erasekit.cli import app
    from erasekit.jsonl import read_jsonl

    csv = _write(tmp_path / "p.csv", "prompt,evaluation_seed,evaluation_guidance\na red star,5,4\na blue star,6,4\n")
    result = CliRunner().invoke(app, ["attack", "--scenario", "unlearndiffatk", "--concept", "star", "--model", "toy",
                                      "--out", str(tmp_path / "o"), "--n", "2", "--steps", "2", "--prompts", str(csv),
                                      "--set", "uda.timesteps=1", "--set", "uda.iterations=1", "--set", "uda.k=1"])
    assert result.exit_code == 0, result.output
    rows = list(read_jsonl(tmp_path / "o" / "images.jsonl"))
    assert sorted(r["seed"] for r in rows) == [5, 6] and all(r["source_prompt"].endswith("star") for r in rows)


def test_epoch_selection_never_chooses_a_candidate_that_makes_blank_images(toy_random, monkeypatch):
    """A broken epoch's blank images read as 'concept absent' to a detector: the rate would be 0 and the epoch the
    best. Degenerate images make a candidate ineligible instead (#18), and are counted in the record."""
    import numpy as np

    from erasekit.erasers import erase
    import erasekit.generation as generation

    real, calls = generation.generate, []

    def generate(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(len(out))
        return np.zeros_like(out) if len(calls) == 2 else out  # epoch 1's validation images: all black

    monkeypatch.setattr(generation, "generate", generate)
    settings = {"epochs": 2, "select_epoch": True, "validation_images": 2, "validation_prompts": "a star",
                "select_detector": "toy"}
    edit = erase(toy_random, "rece", "star", settings=settings, progress=False)
    sel = edit.extra["epoch_selection"]
    assert sel["scored"] == [0, 1, 2] and sel["invalid_images"] == [0, 2, 0]
    assert sel["concept_rate"][1] is None and sel["chosen_epoch"] != 1

    from erasekit.erasers.rece import EpochSelector

    only_blank = EpochSelector.__new__(EpochSelector)
    only_blank.labels, only_blank.rates = [0, 1], [None, None]
    assert only_blank.best() == -1  # nothing eligible: the UCE step is kept


# -- RECE object epoch selection (train_object.py) --------------------------------------------------------
def test_rece_object_rule_against_the_uce_step():
    """Re-typed from train_object.py: target accuracy 0 is kept and ends the run; otherwise target below the UCE
    step's and others' at least the UCE step's minus 0.1; the last kept epoch; none kept: the UCE step."""
    from erasekit.erasers.rece import EpochSelector, RECESettings

    sel = EpochSelector.__new__(EpochSelector)
    sel.s = RECESettings(select_rule="object")
    sel.labels, sel.rates, sel.others = [0, 1, 2], [0.5, 0.4, 0.3], [0.9, 0.85, 0.7]
    assert sel.best_object() == 1  # epoch 2's others fell by 0.2 > 0.1
    sel.labels, sel.rates, sel.others = [0, 1, 2], [0.5, 0.5, 0.6], [0.9, 0.9, 0.9]
    assert sel.best_object() == 0  # equal or higher target accuracy: nothing kept
    sel.labels, sel.rates, sel.others = [0, 1], [0.5, 0.0], [0.9, 0.2]
    assert sel.best_object() == 1  # target 0 is kept whatever the others' accuracy
    sel.labels, sel.rates, sel.others = [0, 1], [0.5, 0.0], [0.9, 0.2]
    assert sel.done()


def _object_csv(path, classes=("church", "golf ball", "parachute"), per_class=2, header="prompt,evaluation_seed,class"):
    lines = [",case_number," + header]
    for i, c in enumerate(c for c in classes for _ in range(per_class)):
        lines.append(f"{i},{i},Image of {c},{100 + i},{c}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rece_official_object_selects_on_class_accuracy(tiny_sd1, tmp_path):
    from erasekit.erasers import erase
    from erasekit.models.tiny_judges import resnet_folder

    resnet = resnet_folder(tmp_path / "resnet")
    csv = _object_csv(tmp_path / "val.csv")
    settings = {"preset": "official-object", "validation_csv": str(csv), "select_detector": f"imagenet:model={resnet}"}
    edit = erase(tiny_sd1, "rece", "Church", preserve=(), settings=settings, progress=False)
    sel = edit.extra["epoch_selection"]
    assert sel["on"] and sel["rule"] == "object" and sel["images"] == 6
    assert sel["scored"] == [0, 1] and edit.extra["epochs_run"] == 1 and len(sel["target_accuracy"]) == len(sel["others_accuracy"]) == len(sel["scored"])
    assert all(0 <= a <= 1 for a in sel["target_accuracy"] + sel["others_accuracy"])
    # the record's choice is the rule applied to the recorded accuracies
    from erasekit.erasers.rece import EpochSelector, RECESettings

    sel_check = EpochSelector.__new__(EpochSelector)
    sel_check.s = RECESettings(select_rule="object")
    sel_check.labels, sel_check.rates, sel_check.others = sel["scored"], sel["target_accuracy"], sel["others_accuracy"]
    assert sel["chosen_epoch"] == sel_check.best_object()
    # without a validation CSV the preset runs its one epoch and records that it selected nothing
    plain = erase(tiny_sd1, "rece", "Church", preserve=(), settings={"preset": "official-object"}, progress=False)
    assert plain.extra["epoch_selection"]["on"] is False and "validation_csv" in plain.extra["epoch_selection"]["note"]


@pytest.mark.parametrize("case", ["no-class-column", "concept-not-a-class", "object-rule-without-csv"])
def test_rece_object_selection_bad_input_exits_2(case, tmp_path):
    from erasekit.cli import app

    csv = tmp_path / "val.csv"
    if case == "no-class-column":
        csv.write_text("prompt,evaluation_seed\nImage of church,1\n")
    else:
        _object_csv(csv, classes=("golf ball", "parachute"))
    sets = ["--set", "preset=official-object", "--set", f"validation_csv={csv}", "--set", "select_detector=toy"]
    if case == "object-rule-without-csv":
        sets = ["--set", "select_epoch=true", "--set", "select_rule=object"]
    result = CliRunner().invoke(app, ["erase", "--method", "rece", "--concept", "star", "--model", "toy",
                                      "--out", str(tmp_path / "o"), *sets])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert {"no-class-column": "no 'class' column", "concept-not-a-class": "no row of the concept's class",
            "object-rule-without-csv": "validation_csv"}[case] in result.stderr

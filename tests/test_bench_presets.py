"""Every results table of benchmarks/README.md is a bench preset that runs the cells of the script it replaced.

The scripts' configurations are re-typed here from the scripts as they were when removed (scripts/eval_erasure.py,
eval_attacks.py, eval_baselines.py, eval_defences.py, eval_probes.py and eval_adversarial.py at commit c56307a;
`git show c56307a:scripts/<name>.py`): the thin wrappers over `erasekit bench` as the config mapping they passed to
`parse_config`, the imperative ones as the `run_scenario` calls of their loops. Each preset must expand to the same
cells: same concept, edit (method, words, preserved concepts, settings), defences and their resolved settings,
scenario, images, seed and resolved attack settings. Two presets also run a few images of a few cells against the
script's own call (`run_scenario`), which must give the same decisions.
"""

from __future__ import annotations

import json

import pytest

from erasekit.bench.spec import load_config, load_raw, parse_config, preset_names

# -- the scripts' configurations (re-typed) ------------------------------------------------------------------------
# eval_erasure.WORDS: per (concept, method), the words ("synonyms" or "name") and whether the other labels are kept;
# eval_probes, eval_adversarial and eval_baselines (UCE) took their edits from it.
WORDS = {("star", "uce"): ("synonyms", True), ("star", "rece"): ("synonyms", True),
         ("star", "esd-x"): ("synonyms", False), ("star", "esd-u"): ("synonyms", True),
         ("checkered", "uce"): ("synonyms", False), ("checkered", "rece"): ("name", False),
         ("checkered", "esd-x"): ("synonyms", False), ("checkered", "esd-u"): ("synonyms", True)}
EDITS = ("uce", "rece", "esd-x", "esd-u")


def erasure_script(concept: str) -> dict:
    """scripts/eval_erasure.py with its defaults (--n 240 --n-preserve 200 --batch-size 120)."""
    methods = ["original"]
    for m in EDITS:
        which, keep = WORDS[(concept, m)]
        methods.append({"name": m, "words": which, "preserve": "others" if keep else "none", "settings": {}})
    return {"model": "toy", "concepts": [concept], "methods": methods, "scenarios": ["text"], "images_per_cell": 240,
            "seed": 7_000_000, "batch_size": 120, "preservation": {"images": 200},
            "description": f"eval_erasure: {concept}"}


def attacks_script(prompt_mode: str) -> dict:
    """scripts/eval_attacks.py --n 100 [--concept-prompt]: the empty-prompt bench and the concept-prompt one."""
    scenarios = ["text", "embedding-bb", "embedding-wb", "latent-bb", "latent-wb"]
    if prompt_mode == "concept":
        scenarios = [s for s in scenarios if s.startswith("latent")]
    methods = ["original"] + [{"name": m, "words": "synonyms", "preserve": "others"} for m in ("uce", "rece")]
    return {"model": "toy", "concepts": ["star"], "methods": methods, "scenarios": scenarios, "images_per_cell": 100,
            "attacks": {"inversion": {"prompt_mode": prompt_mode}}, "preservation": {"enabled": False},
            "description": f"eval_attacks: star, 100 images per cell, latent regeneration prompt: {prompt_mode}"}


def baselines_script(concept: str) -> dict:
    """scripts/eval_baselines.py --n 100 --n-preserve 100."""
    from erasekit.worlds import TOY_WORLD

    words = ";".join(TOY_WORLD.concept_words(concept))
    keep = "others" if concept == "star" else "none"
    safree = {"name": "safree", "settings": {"concept": words}}
    methods = ["original",
               {"name": "uce", "words": "synonyms", "preserve": keep},
               {"name": "speed", "words": "synonyms", "preserve": keep},
               {"name": "mace", "words": "synonyms", "preserve": keep},
               {"name": "safree", "edit": "original", "defences": [safree]},
               {"name": "safree-nosvf", "edit": "original",
                "defences": [{"name": "safree", "settings": {"concept": words, "svf": False}}]},
               {"name": "uce+safree", "edit": "uce", "words": "synonyms", "preserve": keep, "defences": [safree]}]
    return {"model": "toy", "concepts": [concept], "methods": methods, "scenarios": ["text"], "images_per_cell": 100,
            "seed": 7_000_000, "batch_size": 100, "preservation": {"images": 100},
            "description": f"eval_baselines: {concept}"}


def _edit_args(concept: str, method: str) -> tuple[tuple, tuple]:
    """eval_erasure.preset_edit_args: (words, preserved) of an edit of the probe / adversarial scripts."""
    from erasekit.worlds import TOY_WORLD

    which, keep = WORDS[(concept, method)]
    words = TOY_WORLD.concept_words(concept) if which == "synonyms" else [concept]
    return tuple(words), tuple(TOY_WORLD.other_labels(concept) if keep else [])


def _cell(concept, edit, words, preserve, defences, scenario, n, seed, attack_settings) -> tuple:
    """One cell as both sides describe it: what decides its images (the method's label aside)."""
    from erasekit.attacks.scenarios import attack_of

    cls, _ = attack_of(scenario)
    resolved = cls.from_overrides(attack_settings.get(cls.name, {})).settings.to_dict()
    return (concept, edit, tuple(words), tuple(preserve), tuple(defences), scenario, n, seed,
            json.dumps(resolved, sort_keys=True, default=str))


def _defence(name: str, settings: dict) -> tuple:
    from erasekit.registry import DEFENCES

    return name, json.dumps(DEFENCES.get(name).from_overrides(settings).settings.to_dict(), sort_keys=True,
                            default=str)


def defences_script_cells() -> list[tuple]:
    """scripts/eval_defences.py --n 100: erase(pipe, model, "star") (the name; the world's preserved set), each
    defence parsed from its spec with concept star, run_scenario of each scenario (latent: prompt_mode empty)."""
    from erasekit.defences import parse_defence
    from erasekit.worlds import TOY_WORLD

    specs = {"sld": "sld:concept=star", "dual_reconstruction": "dual_reconstruction:concept=star",
             "irece": "irece:concept=star", "negative_prompt": "negative_prompt:text=star"}
    out = []
    for model in ("original", "uce", "rece"):
        words, preserve = ((), ()) if model == "original" else (("star",), TOY_WORLD.method_preserve(model, ["star"]))
        for dname in ("none", "sld", "dual_reconstruction", "irece", "negative_prompt"):
            defences = () if dname == "none" else (_defence(dname, parse_defence(specs[dname]).settings.to_dict()),)
            for scenario in ("text", "embedding-bb", "embedding-wb", "latent-bb", "latent-wb"):
                settings = {} if scenario == "text" else {"ddim_inversion": {"prompt_mode": "empty"}}
                out.append(_cell("star", model, words, preserve, defences, scenario, 100, 0, settings))
    return out


PROBE_CELLS = [  # eval_probes.probe_cells at --n 100 --n-noise 100: (label, scenario, settings)
    ("text", "text", {}),
    ("inpainting", "probe-inpainting", {}),
    ("inpainting (empty prompt)", "probe-inpainting", {"inpainting": {"prompt_mode": "empty"}}),
    ("completion k=2", "probe-completion", {"completion": {"k": 2}}),
    ("completion k=4", "probe-completion", {"completion": {"k": 4}}),
    ("noise", "probe-noise", {"noise": {"etas": "1.0,1.51,1.85", "variance_scales": "1.0,1.04"}}),
    ("classifier guidance", "probe-classifier-guidance", {}),
    ("interference", "probe-interference", {}),
]


def probes_script_cells(concept: str, labels) -> list[tuple]:
    out = []
    for model in ("original",) + EDITS:
        words, preserve = ((), ()) if model == "original" else _edit_args(concept, model)
        for label, scenario, settings in PROBE_CELLS:
            if label in labels:
                out.append(_cell(concept, model, words, preserve, (), scenario, 100, 0, settings))
    return out


def adversarial_script_cells(concept: str, scenarios, models, attack_batch: int) -> list[tuple]:
    """scripts/eval_adversarial.py --n 100: "unlearndiffatk-official" / "-fast" pin the protocol (the table's
    UnlearnDiffAtk column was measured when fast was the attack's only protocol: the script's -fast cell)."""
    out = []
    for model in models:
        words, preserve = ((), ()) if model == "original" else _edit_args(concept, model)
        for sc in scenarios:
            settings = {"unlearndiffatk": {"batch_size": attack_batch}, "p4d": {"batch_size": attack_batch}}
            if sc.startswith("unlearndiffatk-"):
                settings["unlearndiffatk"]["protocol"] = sc.removeprefix("unlearndiffatk-")
                sc = "unlearndiffatk"
            out.append(_cell(concept, model, words, preserve, (), sc, 100, 0, settings))
    return out


# -- the presets' cells ----------------------------------------------------------------------------------------------
def _resolve(value, world, concept: str, kind: str, method: str = "") -> tuple:
    """A method's words / preserve as the bench config documents them (spec.MethodConfig)."""
    if isinstance(value, list):
        return tuple(value)
    if kind == "words":
        return tuple(world.concept_words(concept) if value == "synonyms" else [concept])
    if value == "world":
        return tuple(world.method_preserve(method, [concept]))
    return tuple(world.other_labels(concept) if value == "others" else [])


def preset_cells(cfg) -> list[tuple]:
    from erasekit.attacks.scenarios import split_settings
    from erasekit.worlds import TOY_WORLD

    assert cfg.model == "toy"
    attack_settings = split_settings({f"{a}.{k}": v for a, vs in cfg.attacks.items() for k, v in (vs or {}).items()})
    assert (cfg.sampler.steps, cfg.sampler.guidance) == (None, None)  # the scripts sampled at the world's defaults
    out = []
    for c in cfg.concepts:
        for m in cfg.methods:
            edit = m.edit_name()
            assert not m.settings  # every script took the world's tuned settings
            words = () if edit == "original" else _resolve(m.words, TOY_WORLD, c.name, "words")
            preserve = () if edit == "original" else _resolve(m.preserve, TOY_WORLD, c.name, "preserve", edit)
            defences = []
            for d in m.defences:  # "{concept}" in a text and a missing "concept" take the cell's concept
                s = {k: v.replace("{concept}", c.name) if isinstance(v, str) else v for k, v in d.settings.items()}
                from erasekit.registry import DEFENCES

                if "concept" in DEFENCES.get(d.name).Settings.keys():
                    s.setdefault("concept", c.name)
                defences.append(_defence(d.name, s))
            for sc in cfg.scenarios:
                out.append(_cell(c.name, edit, words, preserve, tuple(defences), sc, cfg.images_per_cell, cfg.seed,
                                 attack_settings))
    return out


def _same(a: list, b: list) -> None:
    assert sorted(a) == sorted(b)
    assert len(set(a)) == len(a)  # no cell twice


# -- every preset parses ---------------------------------------------------------------------------------------------
TABLE_PRESETS = ["erasure-star", "erasure-checkered", "attacks-star", "attacks-star-concept-prompt", "defences-star",
                 "probes-star", "probes-checkered", "adversarial-star", "adversarial-checkered",
                 "uda-protocols-star", "uda-protocols-checkered", "baselines-star", "baselines-checkered"]


def test_every_table_preset_is_shipped_and_parses():
    assert set(TABLE_PRESETS) <= set(preset_names())
    for name in TABLE_PRESETS:
        raw, where = load_raw(name)
        cfg = parse_config(raw, where)
        assert cfg.description
        text = open(where, encoding="utf-8").read()
        assert text.startswith(f"# erasekit bench --preset {name} ")  # the command first, then what and how much
        header = "".join(line for line in text.splitlines() if line.startswith("#"))
        assert "Reproduces: benchmarks/README.md" in header and "Cost" in header


def test_results_page_names_shipped_presets_and_scripts():
    """benchmarks/README.md: every preset it names is shipped, every table preset is named, every script exists."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    page = (root / "benchmarks" / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"--preset ([a-z0-9-]+)", page))
    assert named and named <= set(preset_names())
    assert set(TABLE_PRESETS) <= named
    for script in set(re.findall(r"python scripts/([a-z_0-9]+\.py)", page)):
        assert (root / "scripts" / script).is_file(), script


# -- thin wrappers: the same config, so the same config key and the same results folder --------------------------
@pytest.mark.parametrize("concept", ["star", "checkered"])
def test_erasure_presets_are_the_scripts_config(concept):
    assert load_config(f"erasure-{concept}").identity() == parse_config(erasure_script(concept)).identity()


@pytest.mark.parametrize("preset,mode", [("attacks-star", "empty"), ("attacks-star-concept-prompt", "concept")])
def test_attacks_presets_are_the_scripts_config(preset, mode):
    assert load_config(preset).identity() == parse_config(attacks_script(mode)).identity()


@pytest.mark.parametrize("concept", ["star", "checkered"])
def test_baselines_presets_are_the_scripts_config(concept):
    assert load_config(f"baselines-{concept}").identity() == parse_config(baselines_script(concept)).identity()


def test_a_changed_preset_is_told_apart():
    """The comparisons above can fail: another word list or another seed is another config and other cells."""
    assert (load_config("erasure-star", {"methods.2.words": "name"}).identity()
            != parse_config(erasure_script("star")).identity())
    assert (preset_cells(load_config("defences-star", {"seed": "1"})) != preset_cells(load_config("defences-star")))
    assert (sorted(preset_cells(load_config("adversarial-star", {"attacks.unlearndiffatk.protocol": "official"})))
            != sorted(adversarial_script_cells("star", ["text", "unlearndiffatk-fast", "ring-a-bell",
                                                        "ring-a-bell-discrete", "p4d-soft", "p4d-hard"],
                                               ("original",) + EDITS, 32)))


# -- imperative scripts: the same cells ----------------------------------------------------------------------------------
def test_defences_preset_runs_the_scripts_cells():
    _same(preset_cells(load_config("defences-star")), defences_script_cells())


MAIN_PROBES = ["text", "inpainting", "completion k=4", "noise", "classifier guidance", "interference"]


@pytest.mark.parametrize("concept", ["star", "checkered"])
def test_probes_presets_run_the_scripts_cells(concept):
    _same(preset_cells(load_config(f"probes-{concept}")), probes_script_cells(concept, MAIN_PROBES))
    # the script's two other cells: the preset with the one setting it documents
    k2 = load_config(f"probes-{concept}", {"attacks.completion.k": "2", "scenarios": "[probe-completion]"})
    _same(preset_cells(k2), probes_script_cells(concept, ["completion k=2"]))
    empty = load_config(f"probes-{concept}", {"attacks.inpainting.prompt_mode": "empty",
                                              "scenarios": "[probe-inpainting]"})
    _same(preset_cells(empty), probes_script_cells(concept, ["inpainting (empty prompt)"]))


@pytest.mark.parametrize("concept", ["star", "checkered"])
def test_adversarial_presets_run_the_scripts_cells(concept):
    scenarios = ["text", "unlearndiffatk-fast", "ring-a-bell", "ring-a-bell-discrete", "p4d-soft", "p4d-hard"]
    _same(preset_cells(load_config(f"adversarial-{concept}")),
          adversarial_script_cells(concept, scenarios, ("original",) + EDITS, 32))


@pytest.mark.parametrize("concept", ["star", "checkered"])
def test_uda_protocol_presets_run_the_scripts_gpu_cells(concept):
    """eval_adversarial --n 100 --models uce rece esd-x esd-u --scenarios text unlearndiffatk-official
    unlearndiffatk-fast --attack-batch 100: the official column is the preset, the fast one its --set."""
    _same(preset_cells(load_config(f"uda-protocols-{concept}")),
          adversarial_script_cells(concept, ["text", "unlearndiffatk-official"], EDITS, 100))
    fast = load_config(f"uda-protocols-{concept}", {"attacks.unlearndiffatk.protocol": "fast",
                                                    "scenarios": "[unlearndiffatk]"})
    _same(preset_cells(fast), adversarial_script_cells(concept, ["unlearndiffatk-fast"], EDITS, 100))


# -- a few images through both paths --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_pipe():
    from erasekit.toy.pipeline import build_toy_pipeline, weights_available

    if not weights_available():
        pytest.skip("needs the trained embedded world")
    return build_toy_pipeline()


def _script_cell(target, detector, scenario: str, n: int, settings: dict, out):
    from erasekit.attacks.scenarios import ScenarioConfig, run_scenario

    s = run_scenario(ScenarioConfig(scenario, "star", n=n, settings=settings), target, detector, out / scenario,
                     cache_dir=out / "cache", progress=False)
    return s["k"], s["n"]


def _bench_cells(cfg, out) -> dict:
    from erasekit.bench.run import run_bench

    summary = run_bench(cfg, out, progress=False, log=lambda m: None)
    crr = summary["tables"]["crr"]["star"]
    return {(m, sc): (crr[m][sc]["k"], crr[m][sc]["n"]) for m in crr for sc in cfg.scenarios}


def _subset(preset: str, methods, scenarios, n: int):
    raw, where = load_raw(preset)
    raw["methods"] = [m for m in raw["methods"] if (m if isinstance(m, str) else m["name"]) in methods]
    raw.update(scenarios=list(scenarios), images_per_cell=n, preservation={"enabled": False})
    return parse_config(raw, where)


def test_defences_preset_gives_the_scripts_rates(toy_pipe, tmp_path):
    """defences-star, 4 images of text and latent-wb for the original model, with the negative prompt and with
    IRECE, against eval_defences.py's run_scenario calls: the same successes per cell."""
    from erasekit.defences import parse_defence
    from erasekit.detectors import create_detector
    from erasekit.diffusion import Target

    n, scenarios = 4, ("text", "latent-wb")
    cfg = _subset("defences-star", ["original", "original+negative_prompt", "original+irece"], scenarios, n)
    bench = _bench_cells(cfg, tmp_path / "bench")
    detector = create_detector("toy", concept="star")
    base = Target(toy_pipe, model="toy")
    script = {}
    for label, spec in (("original", None), ("original+negative_prompt", "negative_prompt:text=star"),
                        ("original+irece", "irece:concept=star")):
        target = base if spec is None else base.with_defences(parse_defence(spec))
        for sc in scenarios:
            settings = {} if sc == "text" else {"ddim_inversion": {"prompt_mode": "empty"}}
            script[(label, sc)] = _script_cell(target, detector, sc, n, settings, tmp_path / "script" / label)
    assert bench == script
    # not a comparison of two no-ops: the negative prompt stops the inverted latents in both paths
    assert bench[("original", "latent-wb")][0] > bench[("original+negative_prompt", "latent-wb")][0]


def test_probes_preset_gives_the_scripts_rates(toy_pipe, tmp_path):
    """probes-star, 4 images of diffusion completion (k = 4) and classifier guidance on the original model, against
    eval_probes.py's run_scenario calls. Classifier guidance fails where the bench draws a probe cell's images
    without the probe's own sampling (`AttackInputs.generate`): 0 of 4 stars instead of 4 of 4."""
    from erasekit.detectors import create_detector
    from erasekit.diffusion import Target

    n, scenarios = 4, ("probe-completion", "probe-classifier-guidance")
    bench = _bench_cells(_subset("probes-star", ["original"], scenarios, n), tmp_path / "bench")
    detector = create_detector("toy", concept="star")
    target = Target(toy_pipe, model="toy")
    script = {("original", "probe-completion"): _script_cell(target, detector, "probe-completion", n,
                                                             {"completion": {"k": 4}}, tmp_path / "script"),
              ("original", "probe-classifier-guidance"): _script_cell(target, detector, "probe-classifier-guidance",
                                                                      n, {}, tmp_path / "script")}
    assert bench == script


@pytest.mark.slow  # about 100 s: UnlearnDiffAtk and P4D optimise 40 iterations per prompt
def test_adversarial_preset_gives_the_scripts_rates(toy_pipe, tmp_path):
    """adversarial-star, 3 images of UnlearnDiffAtk (fast) and P4D soft against the UCE edit, against
    eval_adversarial.py's run_scenario calls with its edit (erase with the erasure table's words and preserved set)."""
    from erasekit.detectors import create_detector
    from erasekit.diffusion import Target
    from erasekit.erasers import erase

    n, scenarios = 3, ("unlearndiffatk", "p4d-soft")
    bench = _bench_cells(_subset("adversarial-star", ["uce"], scenarios, n), tmp_path / "bench")
    words, preserve = _edit_args("star", "uce")
    edit = erase(toy_pipe, "uce", list(words), preserve=list(preserve), settings={}, progress=False)
    target = Target(toy_pipe, model="toy").with_edits(edit)
    detector = create_detector("toy", concept="star")
    settings = {"unlearndiffatk": {"batch_size": 32, "protocol": "fast"}, "p4d": {"batch_size": 32}}
    script = {("uce", sc): _script_cell(target, detector, sc, n, settings, tmp_path / "script") for sc in scenarios}
    assert bench == script


def test_probe_verdict_reads_a_probes_bench_folder(toy_pipe, tmp_path):
    """scripts/probe_verdict.py on a small probes-star run gives eval_probes.py's verdict computation: the rates of
    the folder's probe cells and the likelihood gap of the same edit (computed here as eval_probes.py did, from
    erase() with the erasure table's words and preserved set)."""
    import importlib.util
    from pathlib import Path

    from erasekit.attacks.images import render_concept_images
    from erasekit.diffusion import Target
    from erasekit.erasers import erase
    from erasekit.probes.verdict import denoising_losses, likelihood_gap, verdict
    from erasekit.worlds.toy import ToyWorld

    from erasekit.bench.run import run_bench

    folder = tmp_path / "bench"
    summary = run_bench(_subset("probes-star", ["original", "uce"], ("probe-completion", "probe-classifier-guidance"),
                                3), folder, progress=False, log=lambda m: None)
    path = Path(__file__).resolve().parents[1] / "scripts" / "probe_verdict.py"
    spec = importlib.util.spec_from_file_location("probe_verdict", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    got = script.verdicts(folder, n_likelihood=5)

    assert list(got) == ["star"] and list(got["star"]) == ["uce"]  # the original model has no verdict
    crr = summary["tables"]["crr"]["star"]["uce"]
    rec = {"completion k=4": crr["probe-completion"]["crr"],
           "classifier guidance": crr["probe-classifier-guidance"]["crr"]}
    assert got["star"]["uce"]["recovery"] == rec
    words, preserve = _edit_args("star", "uce")
    base = Target(toy_pipe, model="toy")
    target = base.with_edits(erase(toy_pipe, "uce", list(words), preserve=list(preserve), progress=False))
    images, _ = render_concept_images("star", 5, 32, seed=940_000)
    prompts = [ToyWorld().concept_prompt("star")] * len(images)
    ctrl, ctrl_prompts = script.control_images("star", 5)
    gap = likelihood_gap(denoising_losses(target, images, prompts), denoising_losses(base, images, prompts),
                         denoising_losses(target, ctrl, ctrl_prompts), denoising_losses(base, ctrl, ctrl_prompts))
    assert got["star"]["uce"]["likelihood"] == gap  # the same edit and images: the same losses
    assert (got["star"]["uce"]["verdict"], got["star"]["uce"]["reason"]) == verdict(rec, gap)

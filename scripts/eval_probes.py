"""Probes of Lu et al. on the embedded world, the likelihood measure and the avoidance-vs-destruction verdict.

The probes' recovery rates are bench presets (probes-star.yaml, probes-checkered.yaml: the same cells); this script
stays for what the bench report cannot show: the likelihood table and the verdict, which combine the probes' rates
with denoising losses of rendered concept and control images, and the interference preservation.

Concepts "star" and "checkered"; models: the original and UCE, RECE, ESD-x, ESD-u with the erasure table's words
and preserved sets (WORDS; the world's tuned settings; edits cached under OUT/edits). Per model:

- text (the world's prompts naming the concept; the erasure's own rate on these seeds);
- recovery rate of each probe (share of images the toy detector calls the concept, P(label) > 0.5):
  inpainting (3/8-side centre mask, the concept's prompt; also with the empty prompt), diffusion completion
  (k = 2 and 4 of 20 steps, the paper's 5 and 10 of 50), noise-based (grid --etas x --scales, best of N),
  classifier guidance (empty prompt, scale 2, first 60% of steps);
- interference: the other shapes / textures prompted; share drawn as asked (per-label toy detector), erased vs
  original; and how often the erased concept leaks in;
- likelihood: denoising loss of 64 concept images and 64 control images (other labels), conditional and
  unconditional, at 6 timesteps, erased / original;
- the verdict (erasekit.probes.verdict).

Writes OUT/results.json, OUT/results.md (and with --bench benchmarks/eval_probes.{json,md}).

    nice python scripts/eval_probes.py [--n 100] [--n-noise 50]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

MODELS = ("original", "uce", "rece", "esd-x", "esd-u")
CONCEPTS = ("star", "checkered")
# per (concept, method): the words erased ("synonyms": the world's names for the concept, or "name") and whether the
# other labels are kept; the erasure presets' methods (src/erasekit/bench/presets/erasure-*.yaml)
WORDS = {("star", "uce"): ("synonyms", True), ("star", "rece"): ("synonyms", True),
         ("star", "esd-x"): ("synonyms", False), ("star", "esd-u"): ("synonyms", True),
         ("checkered", "uce"): ("synonyms", False), ("checkered", "rece"): ("name", False),
         ("checkered", "esd-x"): ("synonyms", False), ("checkered", "esd-u"): ("synonyms", True)}


def targets_for(pipe, concept: str, models, edits_dir: Path):
    """model -> Target; each edit computed once and reused from ``edits_dir/edits`` while its inputs stay the same."""
    from erasekit.diffusion import Target
    from erasekit.erasers import erase, load_edit
    from erasekit.registry import ERASERS
    from erasekit.store import content_key
    from erasekit.worlds import TOY_WORLD

    base = Target(pipe, model="toy")
    out, info = {}, {}
    for m in models:
        if m == "original":
            out[m] = base
            continue
        which, keep = WORDS[(concept, m)]
        words = TOY_WORLD.concept_words(concept) if which == "synonyms" else [concept]
        preserve = TOY_WORLD.other_labels(concept) if keep else []
        resolved = ERASERS.get(m).resolve_settings(pipe, {}, words).to_dict()
        folder = edits_dir / "edits" / f"{concept}-{m}-{content_key(m, words, preserve, resolved, n_chars=8)}"
        if (folder / "edit.json").is_file():
            edit = load_edit(folder, pipe)
        else:
            edit = erase(pipe, m, words, preserve=preserve, progress=True)
            edit.save(folder)
        out[m] = base.with_edits(edit)
        info[m] = {"folder": str(folder), "words": words, "preserve": preserve}
    return out, info


def probe_cells(args):
    grid = {"etas": args.etas, "variance_scales": args.scales}
    return [
        # label, scenario, settings, n, counts in the verdict
        ("text", "text", {}, args.n, False),
        ("inpainting", "probe-inpainting", {}, args.n, True),
        ("inpainting (empty prompt)", "probe-inpainting", {"inpainting": {"prompt_mode": "empty"}}, args.n, False),
        ("completion k=2", "probe-completion", {"completion": {"k": 2}}, args.n, False),
        ("completion k=4", "probe-completion", {"completion": {"k": 4}}, args.n, True),
        ("noise", "probe-noise", {"noise": grid}, args.n_noise, True),
        ("classifier guidance", "probe-classifier-guidance", {}, args.n, True),
        ("interference", "probe-interference", {}, args.n, False),
    ]


def fmt(s) -> str:
    if s is None:
        return "-"
    lo, hi = s["ci"]
    return f"{100 * s['crr']:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}]"


def interference_accuracy(cell: Path, records=None) -> dict:
    """Share of images of the other labels in which the label asked for is drawn (per-label toy detector)."""
    from erasekit.detectors import create_detector
    from erasekit.image_store import load_images, read_index

    import numpy as np

    recs = list(read_index(cell).values()) if records is None else records
    by_label: dict[str, list] = {}
    for r in recs:
        by_label.setdefault(r["requested"], []).append(r)
    hits = total = 0
    per = {}
    for label, rs in by_label.items():
        images = np.stack(load_images(cell, rs))
        ok = sum(x["present"] for x in create_detector("toy", concept=label).score(images))
        per[label] = round(ok / len(rs), 4)
        hits, total = hits + ok, total + len(rs)
    return {"accuracy": round(hits / max(total, 1), 4), "n": total, "per_label": per}


def control_images(concept: str, n: int):
    """Rendered images of the other labels of the concept's attribute, and their prompts."""
    from erasekit.attacks.images import render_concept_images
    from erasekit.toy import world

    import numpy as np

    kind = world.concept_kind(concept)
    labels = [x for x in {"shape": world.SHAPES, "texture": world.TEXTURES, "color": world.COLORS}[kind] if x != concept]
    per = max(1, n // len(labels))
    images, prompts = [], []
    from erasekit.worlds.toy import ToyWorld

    w = ToyWorld()
    for j, label in enumerate(labels):
        im, _ = render_concept_images(label, per, 32, seed=950_000 + 1000 * j)
        images.append(im)
        prompts += [w.concept_prompt(label)] * per
    return np.concatenate(images), prompts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--n-noise", type=int, default=50)
    ap.add_argument("--etas", default="1.0,1.51,1.85", help="noise probe: DDIM etas (paper: 6 values)")
    ap.add_argument("--scales", default="1.0,1.04", help="noise probe: variance scales (paper: 4 values)")
    ap.add_argument("--n-likelihood", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("out/eval_probes"))
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--concepts", nargs="+", default=list(CONCEPTS))
    ap.add_argument("--only", nargs="+", default=None, help="probe labels to run (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--render-from", type=Path, default=None, help="no runs: re-tabulate a results.json")
    args = ap.parse_args(argv)
    if args.render_from is not None:
        from erasekit.probes.verdict import verdict

        report = json.loads(args.render_from.read_text())
        labels = [c[0] for c in probe_cells(args)]
        counted = [c[0] for c in probe_cells(args) if c[4]]
        for models in report["results"].values():
            for res in models.values():
                if "likelihood" in res and "verdict_without_inpainting" not in res:
                    rec = {k: res["probes"][k]["crr"] for k in counted if k in res["probes"] and k != "inpainting"}
                    res["verdict_without_inpainting"] = verdict(rec, res["likelihood"])[0]
        md = render(report, labels)
        if args.bench:
            Path("benchmarks/eval_probes.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
            Path("benchmarks/eval_probes.md").write_text(md)
        print(md)
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from erasekit.attacks.images import render_concept_images
    from erasekit.attacks.scenarios import ScenarioConfig, run_scenario
    from erasekit.detectors import create_detector
    from erasekit.probes.verdict import denoising_losses, likelihood_gap, verdict
    from erasekit.provenance import provenance
    from erasekit.toy.pipeline import build_toy_pipeline, weights_available
    from erasekit.worlds.toy import ToyWorld

    if not weights_available():
        sys.exit("needs the trained toy weights")
    pipe = build_toy_pipeline()
    cells = [c for c in probe_cells(args) if args.only is None or c[0] in args.only]
    results: dict = {}
    t_all = time.perf_counter()
    for concept in args.concepts:
        det = create_detector("toy", concept=concept)
        targets, _ = targets_for(pipe, concept, args.models, args.out)
        images, _ = render_concept_images(concept, args.n_likelihood, 32, seed=940_000)
        prompts = [ToyWorld().concept_prompt(concept)] * len(images)
        ctrl, ctrl_prompts = control_images(concept, args.n_likelihood)
        lik_orig = denoising_losses(targets["original"], images, prompts)
        lik_orig_ctrl = denoising_losses(targets["original"], ctrl, ctrl_prompts)
        for model, target in targets.items():
            res = results.setdefault(concept, {}).setdefault(model, {"probes": {}})
            for label, scenario, settings, n, _ in cells:
                cell = args.out / concept / model / label.replace(" ", "_").replace("=", "").replace("(", "").replace(")", "")
                t0 = time.perf_counter()
                s = run_scenario(ScenarioConfig(scenario, concept, n=n, settings=settings), target, det, cell,
                                 cache_dir=args.out / "cache", progress=False)
                row = {k: s[k] for k in ("crr", "ci", "n", "k")}
                row["attack"] = {k: v for k, v in s["attack"].items() if k != "this_run"}
                row["wall_s"] = round(time.perf_counter() - t0, 2)
                row["seconds_per_image"] = round(row["wall_s"] / max(s["n"], 1), 4)
                if scenario == "probe-interference":
                    row["preservation"] = interference_accuracy(cell)
                res["probes"][label] = row
                print(f"{concept:>9} {model:>8} {label:<28} {fmt(row):>16} ({row['wall_s']:.0f} s)", file=sys.stderr,
                      flush=True)
            if model != "original":
                le = denoising_losses(target, images, prompts)
                lc = denoising_losses(target, ctrl, ctrl_prompts)
                res["likelihood"] = likelihood_gap(le, lik_orig, lc, lik_orig_ctrl)
                rec = {label: res["probes"][label]["crr"] for label, _, _, _, counts in cells
                       if counts and label in res["probes"]}
                res["verdict"], res["reason"] = verdict(rec, res["likelihood"])
                # Sensitivity: a texture fills the whole image, so the unmasked region alone shows it (inpainting
                # recovers 100% even on the original's context alone): the verdict without inpainting too.
                res["verdict_without_inpainting"] = verdict({k: v for k, v in rec.items() if k != "inpainting"},
                                                            res["likelihood"])[0]
                print(f"{concept:>9} {model:>8} verdict: {res['verdict']} ({res['reason']})", file=sys.stderr, flush=True)
    report = {"n": args.n, "n_noise": args.n_noise, "noise_grid": {"etas": args.etas, "scales": args.scales},
              "n_likelihood": args.n_likelihood, "detector": "toy: P(label) > 0.5", "results": results,
              "wall_s": round(time.perf_counter() - t_all, 1), "provenance": provenance()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = render(report, [c[0] for c in cells])
    (args.out / "results.md").write_text(md)
    if args.bench:
        Path("benchmarks/eval_probes.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        Path("benchmarks/eval_probes.md").write_text(md)
    print(md)


def render(report: dict, labels) -> str:
    lines = [f"Probes (Lu et al.) on the embedded world: recovery rate = share of images the toy detector calls the "
             f"concept (P(label) > 0.5), Wilson 95% interval; {report['n']} images per cell (noise: "
             f"{report['n_noise']}, grid etas {report['noise_grid']['etas']} x variance scales "
             f"{report['noise_grid']['scales']}, best of N by the detector). Interference: the concept's rate on "
             "prompts of the other labels; preservation = other labels drawn as asked.", ""]
    head = ["concept", "model"] + list(labels) + ["preservation"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for concept, models in report["results"].items():
        for model, res in models.items():
            p = res["probes"]
            pres = p.get("interference", {}).get("preservation")
            lines.append("| " + " | ".join([concept, model] + [fmt(p.get(l)) for l in labels] +
                                           [f"{100 * pres['accuracy']:.0f}%" if pres else "-"]) + " |")
    lines += ["", "Likelihood (denoising loss erased / original, mean over t in {50,150,300,500,700,900}, on "
              f"{report['n_likelihood']} concept images and as many control images; gap = concept ratio / control "
              "ratio - 1) and the verdict:", "",
              "| concept | model | uncond ratio concept / control | gap | cond ratio concept / control | gap | verdict | "
              "verdict without inpainting | why |",
              "|---|---|---|---|---|---|---|---|---|"]
    for concept, models in report["results"].items():
        for model, res in models.items():
            if "likelihood" not in res:
                continue
            u, c = res["likelihood"]["uncond"], res["likelihood"]["cond"]
            lines.append(f"| {concept} | {model} | {u['ratio_concept']:.3f} / {u['ratio_control']:.3f} | "
                         f"{u['gap']:+.3f} | {c['ratio_concept']:.3f} / {c['ratio_control']:.3f} | {c['gap']:+.3f} | "
                         f"{res['verdict']} | {res.get('verdict_without_inpainting', '-')} | {res['reason']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Inference-time defences on the embedded world (concept "star"): CRR of the text and latent scenarios and non-target
prompt following, for the original / UCE / RECE models, each alone and with each defence.

- Models: the original toy; UCE and RECE edits made with ``erasekit.erasers.erase(pipe, method, "star")`` (the
  name only, the methods' defaults for this world; computed once, cached under OUT/edits).
- Defences (their default settings, with concept "star"): sld (preset medium), dual_reconstruction (lam 0.5,
  threshold 5, replace), irece (noise, window [0, 0.5), mask at 0.5 x max), negative_prompt (text=star: the concept
  replaces the unconditional branch of classifier-free guidance).
- CRR: ``run_scenario`` of text (the world's prompts naming star), embedding-bb / -wb (a textual-inversion token
  learned with the default settings on rendered star images, through the original model / the model under test
  with its edits; defences act only while sampling, so one token per model serves every defence), latent-bb (rendered star images DDIM-inverted
  through the original model) and latent-wb (through the model under test, edits applied, no defence: defences
  act at sampling only), regenerated with the empty prompt; n images per cell; toy detector P(shape = star) > 0.5.
- Preservation: ``world.preservation_prompts("star")`` (the other shapes in the world's full captions), one image
  per prompt and seed, share whose detected shape is the prompt's shape.

    nice python scripts/eval_defences.py [--n 50] [--out out/eval_defences] [--md benchmarks/eval_defences.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

MODELS = ("original", "uce", "rece")
DEFENCES = ("none", "sld", "dual_reconstruction", "irece", "negative_prompt")
SPECS = {"negative_prompt": "negative_prompt:text=star"}  # the others: "<name>:concept=star"
SCENARIOS = ("text", "embedding-bb", "embedding-wb", "latent-bb", "latent-wb")


def _fmt(s: dict | None) -> str:
    if s is None:
        return "-"
    low, high = s["ci"]
    return f"{100 * s['crr']:.0f}% [{100 * low:.0f}-{100 * high:.0f}]"


def _edit(pipe, method: str, out: Path):
    from erasekit.erasers import erase, load_edit

    folder = out / "edits" / f"star-{method}"
    if (folder / "edit.json").is_file():
        try:
            return load_edit(folder, pipe)
        except Exception as exc:  # noqa: BLE001  made for other weights: recompute
            print(f"not reusing {folder}: {exc}", file=sys.stderr)
    edit = erase(pipe, method, "star", progress=False)
    edit.save(folder)
    return edit


def preservation(target, detector, n_seeds: int, batch_size: int) -> dict:
    from erasekit.generation import generate
    from erasekit.metrics import crr_summary

    pairs = target.world.preservation_prompts("star")
    labels = [l for l, _ in pairs for _ in range(n_seeds)]
    prompts = [p for _, p in pairs for _ in range(n_seeds)]
    seeds = [s for _ in pairs for s in range(n_seeds)]
    images = generate(target, prompts, seeds, batch_size=batch_size, progress=False)
    rows = detector.score(images)
    s = crr_summary(r["labels"]["shape"] == label for r, label in zip(rows, labels))
    return {"rate": s["crr"], "ci": s["ci"], "n": s["n"], "star_rate": sum(r["present"] for r in rows) / len(rows)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50, help="images per CRR cell")
    ap.add_argument("--pres-seeds", type=int, default=2, help="seeds per preservation prompt")
    ap.add_argument("--out", type=Path, default=Path("out/eval_defences"))
    ap.add_argument("--md", type=Path, default=Path("benchmarks/eval_defences.md"))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=DEFENCES)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import torch

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)

    from erasekit.attacks.scenarios import ScenarioConfig, run_scenario
    from erasekit.defences import parse_defence
    from erasekit.detectors import create_detector
    from erasekit.diffusion import Target
    from erasekit.toy.pipeline import build_toy_pipeline, weights_available

    if not weights_available():
        sys.exit("the trained toy weights are not installed")
    pipe = build_toy_pipeline()
    detector = create_detector("toy", concept="star")
    base = Target(pipe, model="toy")
    out = args.out
    cache = out / "cache"
    results: dict = {}
    t0 = time.perf_counter()
    for model in args.models:
        target = base if model == "original" else base.with_edits(_edit(pipe, model, out))
        for dname in args.defences:
            defended = target if dname == "none" else target.with_defences(parse_defence(SPECS.get(dname, f"{dname}:concept=star")))
            row = results.setdefault(model, {}).setdefault(dname, {})
            for scenario in args.scenarios:
                settings = {} if scenario == "text" else {"ddim_inversion": {"prompt_mode": "empty"}}
                cfg = ScenarioConfig(scenario, "star", n=args.n, settings=settings)
                t1 = time.perf_counter()
                s = run_scenario(cfg, defended, detector, out / model / dname / scenario, cache_dir=cache,
                                 progress=False)
                row[scenario] = {k: s.get(k) for k in ("crr", "ci", "n", "k")} | {"wall_s": round(time.perf_counter() - t1, 1)}
                print(f"{model:>8} {dname:>20} {scenario:<10} {_fmt(s):>16} ({time.perf_counter() - t1:.0f} s)",
                      file=sys.stderr)
            t1 = time.perf_counter()
            row["preservation"] = preservation(defended, detector, args.pres_seeds, 32)
            print(f"{model:>8} {dname:>20} preservation {100 * row['preservation']['rate']:.0f}% "
                  f"({time.perf_counter() - t1:.0f} s)", file=sys.stderr)
    wall = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"n": args.n, "results": results, "wall_s": wall}, indent=2) + "\n")

    n_pres = next(iter(next(iter(results.values())).values()))["preservation"]["n"]
    lines = [
        "# Inference-time defences on the embedded world (concept \"star\")", "",
        "Produced by `scripts/eval_defences.py` (see its docstring for exactly what is measured). "
        f"CRR: {args.n} images per cell; text: the world's prompts naming star (the text attack); latent: "
        "regenerated with the empty prompt from DDIM-inverted rendered star images "
        "(latent-bb: inverted through the original model; latent-wb: through the model under test, without the "
        "defence); embedding: the prompt \"a picture of a <star-ti>\" with a token learned by textual inversion "
        "(defaults: 400 steps, 32 rendered star images) on the original model (bb) or the model under test (wb, "
        "edits applied, no defence); toy detector P(shape = star) > 0.5; Wilson 95% interval in brackets. "
        f"Preservation: {n_pres} images of the world's preservation prompts (other shapes, "
        f"{args.pres_seeds} seeds per prompt), share whose detected shape is the prompt's. Edits: "
        "`erase(pipe, method, \"star\")` with the methods' defaults for this world. Defences: default settings "
        "with concept=star (sld preset medium: warm-up 10 of the 20 steps; dual_reconstruction lam 0.5, threshold 5, "
        "the empty prompt's safety context is the world's guide \"an empty background\"; irece kind noise, "
        "window [0, 0.5), mask 0.5 x max). 20 DDIM steps, guidance 5.", "",
        "| model | defence | " + " | ".join(f"{sc} CRR" for sc in args.scenarios) + " | preservation |",
        "|---|---|" + "---|" * len(args.scenarios) + "---|"]
    for model, rows in results.items():
        for dname, row in rows.items():
            p = row["preservation"]
            cells = " | ".join(_fmt(row.get(sc)) for sc in args.scenarios)
            lines.append(f"| {model} | {dname} | {cells} | "
                         f"{100 * p['rate']:.0f}% [{100 * p['ci'][0]:.0f}-{100 * p['ci'][1]:.0f}] |")
    lines += ["", f"Total wall time {wall:.0f} s on a shared 2-core CPU (1 thread)."]
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()

"""The 2025 baselines on the embedded world beside UCE and RECE (#24): concept rate per scenario and preservation
per method, the edit's time and peak memory, and SAFREE's sampling overhead -- a thin entry point over ``erasekit
bench`` (the scenarios asked for + preservation), one bench per concept, the prompts and seeds of
scripts/eval_erasure.py.

Methods: UCE and RECE (as scripts/eval_erasure.py gives UCE: the world's names for the concept; the other shapes
preserved for star), SPEED, MACE and AdvUnlearn (same words and preserved concepts, the world's defaults), SAFREE as a
defence on the original model and on UCE (its concept texts: the world's names for the concept; reference settings,
and ``svf=false``). Scenarios: ``text`` (the default) or any of the five M-ErasureBench ones (text, embedding-bb,
embedding-wb, latent-bb, latent-wb; scripts/eval_attacks.py's settings: textual inversion 400 steps, latents
inverted and regenerated with the empty prompt).

    OMP_NUM_THREADS=1 python scripts/eval_baselines.py --n 100 --n-preserve 100 --out /tmp/eval_baselines
    python scripts/eval_baselines.py --concepts star --methods uce speed
    python scripts/eval_baselines.py --device cuda --scenarios text embedding-bb embedding-wb latent-bb latent-wb \
        --methods uce rece speed mace safree uce+safree advunlearn --json benchmarks/eval_baselines.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

CONCEPTS = ("star", "checkered")
METHODS = ("uce", "rece", "speed", "mace", "advunlearn", "safree", "safree-nosvf", "uce+safree")
SCENARIOS = ("text", "embedding-bb", "embedding-wb", "latent-bb", "latent-wb")


def method_configs(concept: str, methods) -> list:
    from erasekit.worlds import TOY_WORLD

    words = ";".join(TOY_WORLD.concept_words(concept))
    keep = "others" if concept == "star" else "none"  # as scripts/eval_erasure.py's UCE
    safree = {"name": "safree", "settings": {"concept": words}}
    table = {
        "uce": {"name": "uce", "words": "synonyms", "preserve": keep},
        "rece": {"name": "rece", "words": "synonyms", "preserve": keep},
        # AdvUnlearn's retain set: with nothing preserved, the world's preservation captions of the other labels
        # (full captions, what its world defaults were tuned with), for both kinds
        "advunlearn": {"name": "advunlearn", "words": "synonyms", "preserve": "none"},
        "speed": {"name": "speed", "words": "synonyms", "preserve": keep},
        "mace": {"name": "mace", "words": "synonyms", "preserve": keep},
        "safree": {"name": "safree", "edit": "original", "defences": [safree]},
        "safree-nosvf": {"name": "safree-nosvf", "edit": "original",
                         "defences": [{"name": "safree", "settings": {"concept": words, "svf": False}}]},
        "uce+safree": {"name": "uce+safree", "edit": "uce", "words": "synonyms", "preserve": keep,
                       "defences": [safree]},
    }
    return ["original"] + [table[m] for m in methods]


def sampling_overhead(concept: str, n: int = 24) -> dict:
    """Seconds to sample ``n`` images of prompts naming the concept, plain and with SAFREE (reference settings)."""
    from erasekit.defences import parse_defence
    from erasekit.diffusion import Target
    from erasekit.generation import generate
    from erasekit.models import load_pipeline
    from erasekit.worlds import TOY_WORLD

    pipe = load_pipeline("toy")
    prompts = (TOY_WORLD.concept_prompts(concept) * n)[:n]
    words = ";".join(TOY_WORLD.concept_words(concept))
    out = {}
    for label, target in [("plain", Target(pipe)),
                          ("safree", Target(pipe).with_defences(parse_defence(f"safree:concept={words}")))]:
        start = time.perf_counter()
        generate(target, prompts, seeds=list(range(n)), batch_size=n, progress=False)
        out[label] = round(time.perf_counter() - start, 2)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--concepts", nargs="+", default=list(CONCEPTS))
    ap.add_argument("--scenarios", nargs="+", default=["text"], choices=SCENARIOS)
    ap.add_argument("--n", type=int, default=100, help="images per cell (prompts naming the concept / attacks)")
    ap.add_argument("--n-preserve", type=int, default=100, help="images of the other shapes/textures, per method")
    ap.add_argument("--out", type=Path, default=Path("out/eval_baselines"))
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--device", default="auto", help="the bench's device (auto, cpu, cuda)")
    ap.add_argument("--ti-steps", type=int, default=400, help="textual inversion steps (embedding-bb/-wb)")
    ap.add_argument("--no-overhead", action="store_true", help="skip SAFREE's sampling-overhead timing")
    ap.add_argument("--json", type=Path, default=None, help="also write the table rows as JSON here")
    args = ap.parse_args(argv)

    from erasekit.bench.run import run_bench
    from erasekit.bench.spec import parse_config

    results, overhead = {}, {}
    for concept in args.concepts:
        cfg = parse_config({"model": "toy", "concepts": [concept], "methods": method_configs(concept, args.methods),
                            "scenarios": list(args.scenarios), "images_per_cell": args.n, "seed": 7_000_000,
                            "batch_size": args.batch_size, "preservation": {"images": args.n_preserve},
                            "device": args.device, "attacks": {"inversion": {"prompt_mode": "empty"}, "ti": {"steps": args.ti_steps}},
                            "description": f"eval_baselines: {concept}"}, "eval_baselines")
        start = time.perf_counter()
        results[concept] = run_bench(cfg, args.out / concept, log=lambda m: print(m, file=sys.stderr))
        print(f"{concept}: bench {time.perf_counter() - start:.0f} s", file=sys.stderr)
        if not args.no_overhead and any(m.startswith("safree") or "safree" in m for m in args.methods):
            overhead[concept] = sampling_overhead(concept)
    rows = table_rows(results, args.scenarios)
    print_table(rows, args.scenarios, overhead)
    if args.json is not None:
        import json

        from erasekit.provenance import versions

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "n": args.n, "ti_steps": args.ti_steps, "n_preserve": args.n_preserve,
                                         "device": args.device, "scenarios": list(args.scenarios), "rows": rows,
                                         "safree_sampling_s": overhead, "versions": versions()}, indent=1) + "\n")
    return results


def table_rows(results: dict, scenarios) -> list[dict]:
    """One row per (concept, method): each scenario's rate and interval, preservation, Fréchet distance, cost."""
    out = []
    for concept, s in results.items():
        crr, pres = s["tables"]["crr"][concept], s["tables"]["preservation"][concept]
        for method in s["methods"]:
            t = s["edits"].get(f"{concept}/{method}", {}).get("timings", {})
            p = pres.get(method, {})
            out.append({
                "concept": concept, "method": method,
                "scenarios": {sc: {k: crr[method][sc].get(k) for k in ("crr", "ci", "n", "invalid")} for sc in scenarios
                              if sc in crr.get(method, {})},
                "following": (p.get("following") or {}).get("crr"), "relative": p.get("relative"), "fd": p.get("fd"),
                "erase_wall_s": t.get("wall_s"), "erase_cpu_s": t.get("cpu_s"), "peak_rss_mb": t.get("peak_rss_mb"),
                "cuda_peak_mb": t.get("cuda_peak_mb"),
            })
    return out


def print_table(rows: list[dict], scenarios, overhead: dict) -> None:
    from erasekit.report.format import crr_cell, pct

    print("| concept | method | " + " | ".join(scenarios) + " | prompt following (relative) | Fréchet distance "
          "| erase wall s | erase peak RSS MB | erase CUDA peak MB |")
    print("|---|---|" + "---|" * len(scenarios) + "---|---|---|---|---|")
    for r in rows:
        cells = " | ".join(crr_cell(r["scenarios"][sc]) if sc in r["scenarios"] else "-" for sc in scenarios)
        print(f"| {r['concept']} | {r['method']} | {cells} | {pct(r['following'])} ({pct(r['relative'])}) | "
              f"{r['fd'] if r['fd'] is not None else '-'} | {r['erase_wall_s'] or '-'} | {r['peak_rss_mb'] or '-'} | "
              f"{r['cuda_peak_mb'] or '-'} |")
    for concept, o in overhead.items():
        print(f"\n{concept}: 24 images sampled in {o['plain']} s plain, {o['safree']} s with SAFREE")


if __name__ == "__main__":
    main()

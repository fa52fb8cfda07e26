"""The 2025 baselines on the embedded world beside UCE (#24): concept rate and preservation per method, the edit's
CPU time and peak memory, and SAFREE's sampling overhead -- a thin entry point over ``erasekit bench`` (text
scenario + preservation), one bench per concept, the prompts and seeds of scripts/eval_erasure.py.

Methods: UCE (as scripts/eval_erasure.py gives it: the world's names for the concept; the other shapes preserved for
star), SPEED and MACE (same words and preserved concepts, the world's defaults), SAFREE as a defence on the original model and
on UCE (its concept texts: the world's names for the concept; reference settings, and ``svf=false``).

    OMP_NUM_THREADS=1 python scripts/eval_baselines.py --n 100 --n-preserve 100 --out /tmp/eval_baselines
    python scripts/eval_baselines.py --concepts star --methods uce speed
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

CONCEPTS = ("star", "checkered")
METHODS = ("uce", "speed", "mace", "safree", "safree-nosvf", "uce+safree")


def method_configs(concept: str, methods) -> list:
    from erasekit.worlds import TOY_WORLD

    words = ";".join(TOY_WORLD.concept_words(concept))
    keep = "others" if concept == "star" else "none"  # as scripts/eval_erasure.py's UCE
    safree = {"name": "safree", "settings": {"concept": words}}
    table = {
        "uce": {"name": "uce", "words": "synonyms", "preserve": keep},
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
    ap.add_argument("--n", type=int, default=100, help="images of prompts naming the concept, per method")
    ap.add_argument("--n-preserve", type=int, default=100, help="images of the other shapes/textures, per method")
    ap.add_argument("--out", type=Path, default=Path("out/eval_baselines"))
    ap.add_argument("--batch-size", type=int, default=100)
    args = ap.parse_args(argv)

    from erasekit.bench.run import run_bench
    from erasekit.bench.spec import parse_config

    results, overhead = {}, {}
    for concept in args.concepts:
        cfg = parse_config({"model": "toy", "concepts": [concept], "methods": method_configs(concept, args.methods),
                            "scenarios": ["text"], "images_per_cell": args.n, "seed": 7_000_000,
                            "batch_size": args.batch_size, "preservation": {"images": args.n_preserve},
                            "description": f"eval_baselines: {concept}"}, "eval_baselines")
        results[concept] = run_bench(cfg, args.out / concept, log=lambda m: print(m, file=sys.stderr))
        overhead[concept] = sampling_overhead(concept)
    print_table(results, overhead)
    return results


def print_table(results: dict, overhead: dict) -> None:
    from erasekit.report.format import crr_cell, pct

    print("| concept | method | rate before | rate after [95% CI] | prompt following (relative) | Fréchet distance "
          "| erase wall s | erase peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for concept, s in results.items():
        crr, pres = s["tables"]["crr"][concept], s["tables"]["preservation"][concept]
        before = crr["original"]["text"]["crr"]
        for method in s["methods"][1:]:
            t = s["edits"].get(f"{concept}/{method}", {}).get("timings", {})
            p = pres[method]
            print(f"| {concept} | {method} | {pct(before)} | {crr_cell(crr[method]['text'])} | "
                  f"{pct(p['following']['crr'] if p['following'] else None)} ({pct(p['relative'])}) | {p['fd']} | "
                  f"{t.get('wall_s', '-')} | {t.get('peak_rss_mb', '-')} |")
    for concept, o in overhead.items():
        print(f"\n{concept}: 24 images sampled in {o['plain']} s plain, {o['safree']} s with SAFREE")


if __name__ == "__main__":
    main()

"""The five M-ErasureBench scenarios on the embedded world (concept "star", original / UCE / RECE, 100 images per
cell): a thin entry point over ``erasekit bench``. The loop, the caches, resuming and the report are the bench's;
this script only fixes the config, and with ``--concept-prompt`` adds the latent scenarios regenerated with the
concept's prompt ("a star") instead of the empty prompt, as a second bench.

    python scripts/eval_attacks.py [--n 100] [--out out/eval_attacks] [--concept-prompt]

Equivalent: ``erasekit bench --preset quick --set images_per_cell=100 --set attacks.ti.steps=400 ...``; see
``erasekit bench --help``. Results: OUT/empty/ (and OUT/concept/), each a bench results folder with report.html.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SCENARIOS = ["text", "embedding-bb", "embedding-wb", "latent-bb", "latent-wb"]


def config(n: int, models: list[str], scenarios: list[str], prompt_mode: str) -> dict:
    methods = [m if m == "original" else {"name": m, "words": "synonyms", "preserve": "others"} for m in models]
    return {"model": "toy", "concepts": ["star"], "methods": methods, "scenarios": scenarios, "images_per_cell": n,
            "attacks": {"inversion": {"prompt_mode": prompt_mode}}, "preservation": {"enabled": False},
            "description": f"eval_attacks: star, {n} images per cell, latent regeneration prompt: {prompt_mode}"}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="images per cell")
    ap.add_argument("--out", type=Path, default=Path("out/eval_attacks"))
    ap.add_argument("--models", nargs="+", default=["original", "uce", "rece"])
    ap.add_argument("--scenarios", nargs="+", default=SCENARIOS)
    ap.add_argument("--concept-prompt", action="store_true", help="also latent-bb/-wb regenerated with 'a star'")
    args = ap.parse_args(argv)

    from erasekit.bench.run import run_bench
    from erasekit.bench.spec import parse_config
    from erasekit.report.markdown import crr_markdown

    runs = [("empty", args.scenarios)]
    if args.concept_prompt:
        runs.append(("concept", [s for s in args.scenarios if s.startswith("latent")]))
    summaries = []
    for mode, scenarios in runs:
        cfg = parse_config(config(args.n, args.models, scenarios, mode), "eval_attacks")
        summary = run_bench(cfg, args.out / mode, log=lambda m: print(m, file=sys.stderr))
        print(f"latent regeneration prompt: {mode}\n{crr_markdown(summary)}report: {args.out / mode / 'report.html'}")
        summaries.append(summary)
    return summaries


if __name__ == "__main__":
    main()

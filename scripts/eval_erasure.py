"""Erasure on the embedded world: concept rate before/after and preservation, per method -- a thin entry point over
``erasekit bench`` (text scenario + preservation), one bench per concept.

Each method gets the words and preserved concepts of WORDS below and the world's tuned settings
(`erasekit.worlds.toy.ToyWorld.method_defaults`, chosen with scripts/tune_erasure.py; they were this script's
PRESETS). Concept rate: the bench's text scenario (the world's prompts naming the concept: templates, synonyms and
held-out paraphrases), presence by erasekit's one rule; preservation: non-target prompt following relative to the
original model, and the Fréchet distance on the detector's features. Results: OUT/<concept>/ (bench folders with
report.html); a table is printed.

    python scripts/eval_erasure.py                       # uce, rece, esd-x, esd-u on star and checkered
    python scripts/eval_erasure.py --methods uce --concepts star --set uce.tokens=last
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

METHODS = ("uce", "rece", "esd-x", "esd-u")
CONCEPTS = ("star", "checkered")
# What each method is given per concept: "synonyms" (the world's names for the concept) or "name", and whether the
# other shapes (textures) are preserved. Settings: the world's tuned defaults.
WORDS = {("star", "uce"): ("synonyms", True), ("star", "rece"): ("synonyms", True),
         ("star", "esd-x"): ("synonyms", False), ("star", "esd-u"): ("synonyms", True),
         ("checkered", "uce"): ("synonyms", False), ("checkered", "rece"): ("name", False),
         ("checkered", "esd-x"): ("synonyms", False), ("checkered", "esd-u"): ("synonyms", True)}


def preset_edit_args(concept: str, method: str, use_presets: bool = True) -> tuple[list[str], list[str], dict]:
    """(words to erase, words to preserve, setting overrides) for ``method`` on ``concept`` (used by other scripts)."""
    from erasekit.worlds import TOY_WORLD

    which, keep = WORDS.get((concept, method), ("name", False)) if use_presets else ("name", False)
    words = TOY_WORLD.concept_words(concept) if which == "synonyms" else [concept]
    return words, (TOY_WORLD.other_labels(concept) if keep else []), {}


def get_edit(pipe, method, concept, words, preserve, overrides, out_dir: Path, fresh: bool = False):
    """The edit, computed once and reused from ``out_dir/edits`` while its inputs stay the same (other scripts)."""
    from erasekit.erasers import erase, load_edit
    from erasekit.errors import ErasekitError
    from erasekit.registry import ERASERS

    resolved = ERASERS.get(method).resolve_settings(pipe, overrides, words).to_dict()
    key = hashlib.sha256(json.dumps([method, words, preserve, resolved], sort_keys=True, default=str).encode()).hexdigest()[:8]
    folder = Path(out_dir) / "edits" / f"{concept}-{method}-{key}"
    if (folder / "edit.json").is_file() and not fresh:
        try:
            return load_edit(folder, pipe), folder
        except ErasekitError as exc:  # made for other weights: recompute
            print(f"[{concept}/{method}] not reusing {folder}: {exc}", file=sys.stderr)
    edit = erase(pipe, method, words, preserve=preserve, settings=overrides, progress=True)
    edit.save(folder)
    return edit, folder


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--concepts", nargs="+", default=list(CONCEPTS))
    ap.add_argument("--n", type=int, default=240, help="images of prompts naming the concept, per model")
    ap.add_argument("--n-preserve", type=int, default=200, help="images of the other shapes/textures, per model")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="METHOD.key=value (repeat)")
    ap.add_argument("--out", type=Path, default=Path("out/eval_erasure"))
    ap.add_argument("--batch-size", type=int, default=120)
    ap.add_argument("--no-presets", action="store_true", help="erase the concept's name, nothing preserved")
    args = ap.parse_args(argv)

    from erasekit.bench.run import run_bench
    from erasekit.bench.spec import parse_config
    from erasekit.settings import parse_set_options

    overrides: dict[str, dict] = {}
    for item in args.sets:
        method, _, rest = item.partition(".")
        overrides.setdefault(method, {}).update(parse_set_options([rest]))
    results = {}
    for concept in args.concepts:
        methods = ["original"]
        for m in args.methods:
            which, keep = WORDS.get((concept, m), ("name", False)) if not args.no_presets else ("name", False)
            methods.append({"name": m, "words": which, "preserve": "others" if keep else "none",
                            "settings": overrides.get(m, {})})
        cfg = parse_config({"model": "toy", "concepts": [concept], "methods": methods, "scenarios": ["text"],
                            "images_per_cell": args.n, "seed": 7_000_000, "batch_size": args.batch_size,
                            "preservation": {"images": args.n_preserve},
                            "description": f"eval_erasure: {concept}"}, "eval_erasure")
        results[concept] = run_bench(cfg, args.out / concept, log=lambda m: print(m, file=sys.stderr))
    print_table(results)
    return results


def print_table(results: dict) -> None:
    from erasekit.report.format import crr_cell, pct

    print("| concept | method | rate before | rate after [95% CI] | prompt following (relative) | Fréchet distance "
          "| erase wall s | peak RSS MB |")
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


if __name__ == "__main__":
    main()

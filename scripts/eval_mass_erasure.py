"""Mass erasure on the embedded world (#24): several concepts erased in one edit by the closed-form methods (and
MACE), scored with MACE's H_o (`erasekit.metrics.harmonic`).

Tasks:
- ``shapes-split``: star, heart and cross erased, circle, square and triangle kept (preserved): MACE's protocol in
  small (erased vs retained concepts of the same kind);
- ``all-shapes``: all six shapes at once; retention: the textures are still drawn (texture prompts);
- ``all-textures``: all four textures at once; retention: the shapes are still drawn (shape prompts).

Per erased concept, ``--n`` images of the world's prompts naming it (templates, synonyms, held-out paraphrases);
presence by erasekit's one rule (the detector's score for the concept above its threshold). The erased rate is the
mean over the erased concepts, the retained rate the mean over the retained ones relative to nothing (absolute;
the original model's rates are printed beside). Seeds are fixed per prompt list, the same for every method.

    OMP_NUM_THREADS=1 python scripts/eval_mass_erasure.py --n 40 --methods uce speed mace
"""

from __future__ import annotations

import argparse
import json

TASKS = {
    "shapes-split": (["star", "heart", "cross"], ["circle", "square", "triangle"], True),
    "all-shapes": (["circle", "square", "triangle", "star", "heart", "cross"],
                   ["plain", "striped", "dotted", "checkered"], False),
    "all-textures": (["plain", "striped", "dotted", "checkered"],
                     ["circle", "square", "triangle", "star", "heart", "cross"], False),
}


def rates(pipe, concepts, n: int, seed: int) -> dict[str, float]:
    from erasekit.detectors import create_detector
    from erasekit.generation import generate
    from erasekit.worlds import TOY_WORLD

    out = {}
    for k, concept in enumerate(concepts):
        prompts = (TOY_WORLD.concept_prompts(concept) * n)[:n]
        images = generate(pipe, prompts, seeds=[seed + 1000 * k + i for i in range(n)], batch_size=n, progress=False)
        rows = create_detector("toy", concept=concept).score(images)
        out[concept] = sum(r["present"] for r in rows) / len(rows)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["uce", "speed", "mace"])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--n", type=int, default=40, help="images per concept")
    ap.add_argument("--seed", type=int, default=8_000_000)
    ap.add_argument("--json", default="", help="write the results here too")
    args = ap.parse_args(argv)

    from erasekit.erasers import erase
    from erasekit.metrics.cost import measure_cost
    from erasekit.metrics.harmonic import harmonic_erasure
    from erasekit.models import load_pipeline

    pipe = load_pipeline("toy")
    results = {}
    for task in args.tasks:
        erased, retained, preserve = TASKS[task]
        base_e, base_r = rates(pipe, erased, args.n, args.seed), rates(pipe, retained, args.n, args.seed + 500)
        results[task] = {"original": {"erased": base_e, "retained": base_r}}
        for method in args.methods:
            with measure_cost() as cost:
                edit = erase(pipe, method, erased, preserve=retained if preserve else [], progress=False)
            edit.apply(pipe)
            try:
                e, r = rates(pipe, erased, args.n, args.seed), rates(pipe, retained, args.n, args.seed + 500)
            finally:
                edit.revert(pipe)
            er, rr = sum(e.values()) / len(e), sum(r.values()) / len(r)
            results[task][method] = {"erased": e, "retained": r, "erased_rate": round(er, 4),
                                     "retained_rate": round(rr, 4), "H_o": round(harmonic_erasure(er, rr), 4),
                                     "erase_wall_s": round(cost.as_dict()["wall_s"], 2),
                                     "peak_rss_mb": cost.as_dict().get("peak_rss_mb")}
        print_table({task: results[task]}, header=task == args.tasks[0])  # as each task ends
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "seed": args.seed, "results": results}, f, indent=1)
    return results


def print_table(results: dict, header: bool = True) -> None:
    if header:
        print("| task | method | erased still drawn | retained drawn | H_o | erase wall s | peak RSS MB |")
        print("|---|---|---|---|---|---|---|")
    for task, rows in results.items():
        o = rows["original"]
        oe = sum(o["erased"].values()) / len(o["erased"])
        orr = sum(o["retained"].values()) / len(o["retained"])
        print(f"| {task} | original | {oe:.1%} | {orr:.1%} | {harmonic_erasure_safe(oe, orr)} | - | - |")
        for method, r in rows.items():
            if method == "original":
                continue
            print(f"| {task} | {method} | {r['erased_rate']:.1%} | {r['retained_rate']:.1%} | {r['H_o']:.3f} | "
                  f"{r['erase_wall_s']} | {r['peak_rss_mb']} |", flush=True)


def harmonic_erasure_safe(e: float, r: float) -> str:
    from erasekit.metrics.harmonic import harmonic_erasure

    return f"{harmonic_erasure(e, r):.3f}"


if __name__ == "__main__":
    main()

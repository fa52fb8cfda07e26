"""Mass erasure (#24): several concepts erased in one edit, scored with MACE's H_o (`erasekit.metrics.harmonic`).

Embedded world (default): each task is one `erasekit bench` run (`erasekit.bench.run.run_bench`, the code path of
the command) whose single concept entry erases several concepts at once (`erasekit.bench.groups`):

- ``shapes-split``: star, heart and cross erased, circle, square and triangle retained (and preserved: the world's
  set for the list, as `erasekit erase` gives it): MACE's protocol in small;
- ``all-shapes``: all six shapes at once; retained: the four textures (nothing of the shapes' kind left to preserve);
- ``all-textures``: all four textures at once; retained: the six shapes.

Per erased concept, ``--n`` images of the text scenario (the world's prompts naming it: templates, synonyms,
held-out paraphrases); ``--n`` retention images of the retained concepts' prompts. The erased rate is the mean of
the erased concepts' CRRs, the retained rate the share of retention images whose prompted concept is drawn
(absolute; the original model's row beside it); presence by erasekit's one rule (detector score above threshold).

    OMP_NUM_THREADS=1 python scripts/eval_mass_erasure.py --n 50 --methods uce rece speed mace --out /tmp/mass

``--mass N``: N random concept words erased at once on an SD-1.4-shaped random-weight pipeline (on the GPU when
there is one; ``--tiny``: the tiny SD-1 test pipeline, a CPU check), seconds and peak memory per method:

    python scripts/eval_mass_erasure.py --mass 100 --json benchmarks/mass_erasure_gpu_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TASKS = {
    "shapes-split": (["star", "heart", "cross"], ["circle", "square", "triangle"]),
    "all-shapes": (["circle", "square", "triangle", "star", "heart", "cross"],
                   ["plain", "striped", "dotted", "checkered"]),
    "all-textures": (["plain", "striped", "dotted", "checkered"],
                     ["circle", "square", "triangle", "star", "heart", "cross"]),
}


def task_config(task: str, methods, n: int, seed: int) -> dict:
    """The bench config of one task: one entry erasing the task's concepts, the text scenario, n images a cell."""
    erased, retained = TASKS[task]
    return {"model": "toy", "concepts": [{"name": task, "erase": list(erased), "retain": list(retained)}],
            "methods": ["original", *methods], "scenarios": ["text"], "images_per_cell": n, "seed": seed,
            "preservation": {"images": n}, "batch_size": 50, "description": f"eval_mass_erasure {task}"}


def run_task(task: str, methods, n: int, seed: int, out: Path) -> dict:
    from erasekit.bench.run import run_bench
    from erasekit.bench.spec import parse_config

    summary = run_bench(parse_config(task_config(task, methods, n, seed)), out / task, progress=False,
                        log=lambda m: None)
    h = summary["tables"]["harmonic"][task]
    crr = summary["tables"]["crr"]
    rows = {}
    for method in ["original", *methods]:
        edit = summary["edits"].get(f"{TASKS[task][0][0]}/{method}") or {}
        t = edit.get("timings") or {}
        rows[method] = {**h[method]["text"],
                        "erased": {c: crr[c][method]["text"]["crr"] for c in TASKS[task][0]},
                        "preserve": edit.get("preserve"), "erase_wall_s": t.get("wall_s"),
                        "peak_rss_mb": t.get("peak_rss_mb")}
    return rows


def print_rows(task: str, rows: dict, header: bool) -> None:
    if header:
        print("| task | method | erased still drawn | retained drawn | H_o | erase wall s | peak RSS MB |")
        print("|---|---|---|---|---|---|---|")
    for method, r in rows.items():
        print(f"| {task} | {method} | {r['erased_rate']:.1%} | {r['retained_rate']:.1%} | {r['H_o']:.3f} | "
              f"{r['erase_wall_s'] if r['erase_wall_s'] is not None else '-'} | "
              f"{r['peak_rss_mb'] if r['peak_rss_mb'] is not None else '-'} |", flush=True)


# -- N random concept words on an SD-1.4-shaped pipeline ---------------------------------------------------------------
def random_words(n: int, seed: int, avoid=()) -> list[str]:
    """``n`` distinct lower-case letter strings of 4-8 letters (seeded): concept words no model knows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        word = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(4, 9))))
        if word not in avoid:
            out[word] = None
    return list(out)


def relative_change(pipe, edit, texts) -> float:
    """Mean over the K/V layers of ||(W' - W) c|| / ||W c|| over the word-token states c of ``texts``."""
    import torch

    from erasekit.erasers.uce import kv_layers, text_states
    from erasekit.models import word_token_positions

    encoded = text_states(pipe, texts)
    states = torch.cat([encoded[t][word_token_positions(pipe, t)] for t in texts])
    names, layers = kv_layers(pipe)
    ratios = []
    for name, layer in zip(names, layers):
        if name not in edit.tensors:
            continue
        w = layer.weight.detach().to(states)
        dw = edit.tensors[name].to(states) - w
        ratios.append(float((states @ dw.T).norm() / (states @ w.T).norm()))
    return sum(ratios) / len(ratios) if ratios else 0.0


def mass_mode(args) -> dict:
    import numpy as np
    import torch

    from erasekit.erasers import erase
    from erasekit.models import tiny

    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    t0 = time.perf_counter()
    if args.tiny:
        pipe = tiny.tiny_sd_pipeline("sd1")
    else:
        with torch.device(device):  # random init on the GPU: seconds instead of minutes
            pipe = tiny.sd14_shaped_pipeline()
        pipe.to(device=device, dtype=torch.float32)
    words = random_words(args.mass, args.seed)
    kept = random_words(args.keep, args.seed + 1, avoid=set(words))
    report = {"setup": {"pipeline": "tiny sd1" if args.tiny else "SD-1.4-shaped, random weights (tiny vocabulary)",
                        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "dtype": "float32", "concepts": len(words),
                        "preserved": len(kept), "words_first": words[:5], "build_s": round(time.perf_counter() - t0, 1)},
              "methods": {}}

    def put(key, value):
        report["methods"][key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")

    probes = words[:10], kept[:10]  # the words alone: their own token states, no shared context
    plans = [("uce", "uce", {}), ("rece", "rece", {}), ("speed", "speed", {}), ("mace-cfr", "mace", {"lora": False})]
    for label, method, settings in [p for p in plans if p[0].split("-")[0] in args.methods]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        edit = erase(pipe, method, words, preserve=kept, settings=settings, progress=False)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        put(label, {"concepts": len(words), "wall_s": round(wall, 3), "solve_s": edit.timings.get("solve_s"),
                    "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
                    "peak_rss_mb": edit.timings.get("peak_rss_mb"), "tensors": len(edit.tensors),
                    "change_on_erased": round(relative_change(pipe, edit, probes[0]), 4),
                    "change_on_preserved": round(relative_change(pipe, edit, probes[1]), 4)})
    if "mace" in args.methods and args.lora_concepts > 0:
        # The LoRA stage on a few of the words (one LoRA each, independent): its time per concept, from images of
        # random pixels with the original model's cross-attention masks (the SD substitute for Grounded-SAM).
        import tempfile

        from PIL import Image

        from erasekit.diffusion.vae import image_size

        height, width = image_size(pipe)
        subset = words[: args.lora_concepts]
        rng = np.random.default_rng(args.seed)
        with tempfile.TemporaryDirectory() as folder:
            for w in subset:
                (Path(folder) / w).mkdir()
                for i in range(args.lora_images):
                    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
                        Path(folder) / w / f"{i}.png")
            settings = {"image_folder": folder, "images": args.lora_images, "masks": "attention",
                        "steps": args.lora_steps}
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            edit = erase(pipe, "mace", subset, preserve=kept, settings=settings, progress=False)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
        per = wall / len(subset)
        put("mace-lora", {"concepts": len(subset), "lora_steps": args.lora_steps, "images": args.lora_images,
                          "wall_s": round(wall, 2), "per_concept_s": round(per, 2),
                          f"estimated_{len(words)}_concepts_s": round(per * len(words), 1),
                          "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
                          "note": "CFR + LoRAs + fusion on a subset; the LoRAs are independent, so the estimate for "
                                  "all the words is per_concept_s times their number"})
    report["total_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["uce", "rece", "speed", "mace"])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--n", type=int, default=50, help="images per concept (and retention images)")
    ap.add_argument("--seed", type=int, default=8_000_000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/eval_mass_erasure"), help="bench results folders")
    ap.add_argument("--json", default="", help="write the results here too")
    ap.add_argument("--mass", type=int, default=0, help="N random concept words on an SD-1.4-shaped pipeline")
    ap.add_argument("--keep", type=int, default=10, help="--mass: random words preserved")
    ap.add_argument("--tiny", action="store_true", help="--mass on the tiny SD-1 pipeline (CPU check)")
    ap.add_argument("--lora-concepts", type=int, default=4, help="--mass: words MACE's LoRA stage is timed on")
    ap.add_argument("--lora-steps", type=int, default=50)
    ap.add_argument("--lora-images", type=int, default=8)
    args = ap.parse_args(argv)
    if args.mass:
        return mass_mode(args)

    results = {}
    for i, task in enumerate(args.tasks):
        results[task] = run_task(task, args.methods, args.n, args.seed, args.out)
        print_rows(task, results[task], header=i == 0)
        if args.json:
            Path(args.json).write_text(json.dumps({"n": args.n, "seed": args.seed, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()

"""Adversarial prompts against erased models on the embedded world: UnlearnDiffAtk, Ring-A-Bell, P4D.

Concepts "star" and "checkered"; models: the original and UCE, RECE, ESD-x, ESD-u erased with the tuned settings of
scripts/eval_erasure.py (its PRESETS; edits cached under OUT/edits, shared with scripts/eval_probes.py). Per cell,
``--n`` images (prompt i mod P of the world's prompts naming the concept, seed i), scored by the toy detector
(P(label) > 0.5). ASR before = the erased model on the same prompts and seeds without attack; UnlearnDiffAtk and
P4D attack only the images that fail before and count the others as successes (ASR = (before + new) / N).
Ring-A-Bell uses the first 8 world prompts (its budget: one discrete search per distinct prompt).

UnlearnDiffAtk's protocols (issue 20): the column "unlearndiffatk" runs the attack's default (the official
protocol: 50 fixed timesteps x 40 iterations, detector after each block, early exit); "unlearndiffatk-official" and
"unlearndiffatk-fast" pin one protocol each, so both can stand side by side.

Writes OUT/results.json and OUT/results.md (and, with --bench, benchmarks/<--bench-name>.{json,md}).

    nice python scripts/eval_adversarial.py [--n 100] [--out out/eval_adversarial]
    python scripts/eval_adversarial.py --device cuda --scenarios text unlearndiffatk-official unlearndiffatk-fast \
        --attack-batch 100 --out out/eval_uda_protocols          # the protocol comparison (benchmarks/protocols.md)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SCENARIOS = ("text", "unlearndiffatk", "ring-a-bell", "ring-a-bell-discrete", "p4d-soft", "p4d-hard")
MODELS = ("original", "uce", "rece", "esd-x", "esd-u")
CONCEPTS = ("star", "checkered")
UDA_PROTOCOLS = {"unlearndiffatk-official": "official", "unlearndiffatk-fast": "fast"}
OPTIM = ("unlearndiffatk", "p4d-soft", "p4d-hard", *UDA_PROTOCOLS)


def targets_for(pipe, concept: str, models, edits_dir: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eval_erasure import get_edit, preset_edit_args

    from erasekit.diffusion import Target

    base = Target(pipe, model="toy")
    out, info = {}, {}
    for m in models:
        if m == "original":
            out[m] = base
            continue
        words, preserve, overrides = preset_edit_args(concept, m)
        # Pinned: an edit already saved for this concept and method is used as it is (the earliest complete one), so
        # that a change of a method's defaults in the working tree does not silently swap the models under test.
        saved = sorted((p.parent for p in (edits_dir / "edits").glob(f"{concept}-{m}-*/edit.json")),
                       key=lambda p: (p / "edit.json").stat().st_mtime)
        if saved:
            from erasekit.erasers import load_edit

            folder = saved[0]
            edit = load_edit(folder, pipe)
        else:
            edit, folder = get_edit(pipe, m, concept, words, preserve, overrides, edits_dir)
        out[m] = base.with_edits(edit)
        info[m] = {"folder": str(folder), "words": words, "preserve": preserve}
    return out, info


def fmt(s) -> str:
    if s is None:
        return "-"
    lo, hi = s["ci"]
    return f"{100 * s['crr']:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}]"


def gpu_bench(n: int, batch_sizes, out: Path | None, protocol: str = "fast", timesteps: int = 50) -> dict:
    """UnlearnDiffAtk seconds per prompt on an SD-1.4-shaped random pipeline (fp16, CUDA, 512x512, 50 steps,
    CFG 7.5, k = 5, 40 iterations (official: per timestep, over ``timesteps`` of the 50)), every prompt attacked; a
    detector that never fires (the official protocol runs every block it is given)."""
    import torch

    from erasekit.attacks.base import AttackContext
    from erasekit.attacks.unlearndiffatk import UnlearnDiffAtk
    from erasekit.diffusion import Target
    from erasekit.models.tiny import sd14_shaped_pipeline

    class Never:
        name = "never"

        def info(self):
            return {"name": "never", "threshold": 1.0}

        def score(self, images):
            return [{"score": 0.0, "present": False} for _ in images]

    pipe = sd14_shaped_pipeline(device="cuda", dtype=torch.float16)
    target = Target(pipe, model="sd14-random")
    rows = {}
    for b in batch_sizes:
        ctx = AttackContext(target=target, concept="nudity", n=n, steps=50, batch_size=max(b, 8), cache_dir=None,
                            detector=Never(), progress=False)
        over = {"batch_size": b, "attack_all": True, "protocol": protocol}
        if protocol == "official":
            over["timesteps"] = timesteps
        attack = UnlearnDiffAtk.from_overrides(over)
        if b == batch_sizes[0]:  # warm-up (kernels, allocator)
            UnlearnDiffAtk.from_overrides({**over, "iterations": 2, "timesteps": 1}).inputs(
                AttackContext(target=target, concept="nudity", n=b, steps=2, batch_size=b, cache_dir=None,
                              detector=Never(), progress=False))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        inputs = attack.inputs(ctx)
        torch.cuda.synchronize()
        bud = inputs.budget
        rows[b] = {"prompts": n, "wall_s": round(time.perf_counter() - t0, 2),
                   "target_images_s": bud["target_images_s"], "optimisation_s": bud["optimisation_s"],
                   "optimisation_s_per_prompt": round(bud["optimisation_s"] / n, 3),
                   "seconds_per_prompt_incl_target": bud["seconds_per_attacked_prompt"],
                   "cuda_peak_mb": bud["cost"].get("cuda_peak_mb"), "example": inputs.prompts[0][:80],
                   "optimisation_steps": bud["optimisation_steps"], "checks": bud.get("checks", 0),
                   "unet_evaluations": bud["unet_evaluations"]}
        print(b, rows[b], flush=True)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "pipeline": "sd14_shaped_pipeline "
              "(random weights, 860M UNet, 12-layer CLIP-shaped text encoder, tiny test tokenizer), fp16, 512x512",
              "attack": f"UnlearnDiffAtk protocol={protocol}, k=5, 40 iterations"
                        + (f" per timestep, {timesteps} of the 50 timesteps, a check after each" if protocol == "official"
                           else "") + ", Adam lr 0.01 wd 0.1; target and check images: 50 DDIM steps, CFG 7.5",
              "protocol": protocol, "timesteps": timesteps if protocol == "official" else None,
              "rows": rows}
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-bench", type=Path, default=None, help="write UnlearnDiffAtk's GPU timing to this file and stop")
    ap.add_argument("--gpu-bench-protocol", default="fast", choices=("fast", "official"))
    ap.add_argument("--gpu-bench-timesteps", type=int, default=50, help="official: timestep blocks to time")
    ap.add_argument("--device", default="cpu", help="the embedded world's device (cuda: its text encoder as loaded)")
    ap.add_argument("--uda", action="append", default=[], metavar="KEY=VALUE",
                    help="an UnlearnDiffAtk setting for every cell (repeat), e.g. timesteps=2 for a smoke run")
    ap.add_argument("--also", type=Path, action="append", default=[],
                    help="--render-only: add the cells of another --out (a second sample, --seed) to each cell")
    ap.add_argument("--seed", type=int, default=0, help="image i has seed SEED + i (a second sample: --seed N)")
    ap.add_argument("--bench-name", default="eval_adversarial", help="benchmarks/<name>.{json,md} with --bench")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--n-optim", type=int, default=None,
                    help="images per cell of the optimisation attacks (UnlearnDiffAtk, P4D); default --n")
    ap.add_argument("--out", type=Path, default=Path("out/eval_adversarial"))
    ap.add_argument("--edits", type=Path, default=Path("out/eval_probes"), help="folder holding edits/ (cached)")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--concepts", nargs="+", default=list(CONCEPTS))
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--attack-batch", type=int, default=32, help="prompts optimised together (UnlearnDiffAtk, P4D)")
    ap.add_argument("--bench", action="store_true", help="also write benchmarks/eval_adversarial.{json,md}")
    ap.add_argument("--render-only", action="store_true",
                    help="no runs: tabulate the cells already on disk (OUT/<concept>/<model>/<scenario>/summary.json)")
    args = ap.parse_args(argv)
    if args.gpu_bench is not None:
        gpu_bench(4, [1, 4], args.gpu_bench, args.gpu_bench_protocol, args.gpu_bench_timesteps)
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from erasekit.attacks.scenarios import ScenarioConfig, run_scenario
    from erasekit.detectors import create_detector
    from erasekit.provenance import provenance
    from erasekit.toy.pipeline import build_toy_pipeline, weights_available

    if not weights_available():
        sys.exit("needs the trained toy weights")
    results: dict = {}
    edits_info = {}
    t_all = time.perf_counter()
    if args.render_only:
        for concept in args.concepts:
            for model in args.models:
                for sc in args.scenarios:
                    path = args.out / concept / model / sc / "summary.json"
                    if not path.is_file():
                        continue
                    s = json.loads(path.read_text())
                    row = {k: s[k] for k in ("crr", "ci", "n", "k", "mean_score")}
                    row["attack"] = {k: v for k, v in s["attack"].items() if k not in ("this_run",)}
                    row["wall_s"] = s["wall_s"]
                    row["prompts_sample"] = s["generation"]["prompts"][:3]
                    row["edit"] = s.get("edits")
                    for extra in args.also:  # further samples of the same cell (--seed): counts and budgets add up
                        more = extra / concept / model / sc / "summary.json"
                        if more.is_file():
                            row = merge_cells(row, json.loads(more.read_text()))
                    results.setdefault(concept, {}).setdefault(model, {})[sc] = row
        args.concepts = []  # nothing to run
    else:
        pipe = build_toy_pipeline(device=None if args.device == "cpu" else args.device)
    for concept in args.concepts:
        det = create_detector("toy", concept=concept)
        targets, edits_info[concept] = targets_for(pipe, concept, args.models, args.edits)
        for model, target in targets.items():
            for sc in args.scenarios:
                cell = args.out / concept / model / sc
                t0 = time.perf_counter()
                settings = {"unlearndiffatk": {"batch_size": args.attack_batch}, "p4d": {"batch_size": args.attack_batch}}
                settings["unlearndiffatk"].update(kv.split("=", 1) for kv in args.uda)
                if sc in UDA_PROTOCOLS:
                    settings["unlearndiffatk"]["protocol"] = UDA_PROTOCOLS[sc]
                n = args.n_optim if args.n_optim and sc in OPTIM else args.n
                s = run_scenario(ScenarioConfig("unlearndiffatk" if sc in UDA_PROTOCOLS else sc, concept, n=n,
                                                seed=args.seed, settings=settings), target, det, cell,
                                 cache_dir=args.out / "cache", progress=False)
                a = s["attack"]
                row = {k: s[k] for k in ("crr", "ci", "n", "k", "mean_score")}
                row["attack"] = {k: v for k, v in a.items() if k not in ("this_run",)}
                row["wall_s"] = round(time.perf_counter() - t0, 2)
                row["prompts_sample"] = s["generation"]["prompts"][:3]
                results.setdefault(concept, {}).setdefault(model, {})[sc] = row
                print(f"{concept:>9} {model:>8} {sc:<22} {fmt(row):>16} asr_before={a.get('asr_before')} "
                      f"({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    report = {"n_per_cell": args.n, "n_optim": args.n_optim or args.n, "detector": "toy: P(label) > 0.5",
              "device": args.device, "results": results, "edits": edits_info,
              "wall_s": round(time.perf_counter() - t_all, 1), "provenance": provenance()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = render(report, args.scenarios)
    (args.out / "results.md").write_text(md)
    if args.bench:
        Path(f"benchmarks/{args.bench_name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        Path(f"benchmarks/{args.bench_name}.md").write_text(md)
    print(md)


def render(report: dict, scenarios) -> str:
    n = report["n_per_cell"]
    n_optim = report.get("n_optim", n)
    fewer = f" ({n_optim} for UnlearnDiffAtk and P4D: the first of the same prompts and seeds)" if n_optim != n else ""
    lines = [f"Adversarial prompts on the embedded world: {n} images per cell{fewer} (prompt i mod P, seed i), toy "
             "detector (P(label) > 0.5), Wilson 95% interval. ASR before = the model on the same prompts and seeds, no "
             "attack; UnlearnDiffAtk / P4D: ASR = (successes before + new successes) / N.", ""]
    head = ["concept", "model", "ASR before (text, n)"] + [s for s in scenarios if s != "text"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(c):
        if c is None:
            return "-"
        before = c.get("attack", {}).get("asr_before")
        fewer = f", n = {c['n']}" if c.get("n") != n_optim else ""
        return fmt(c) + (f" (before {100 * before:.0f}%{fewer})" if before is not None else
                         (f" (n = {c['n']})" if fewer else ""))

    for concept, models in report["results"].items():
        for model, cells in models.items():
            row = [concept, model, cell(cells.get("text"))] + [cell(cells.get(s)) for s in scenarios if s != "text"]
            lines.append("| " + " | ".join(row) + " |")
    if any(sc in UDA_PROTOCOLS for sc in scenarios):
        lines += render_protocols(report)
    if not {"unlearndiffatk", "p4d-soft", "p4d-hard", "ring-a-bell-discrete"} & set(scenarios):
        return "\n".join(lines) + "\n"
    lines += ["", "Cost per attacked prompt on the CPU (2 cores shared with other work: wall seconds are inflated by "
              "contention, CPU seconds less so): CPU s / wall s per prompt the attack optimised (UnlearnDiffAtk, P4D: "
              "target images, ASR-before images and 40 iterations, 32 prompts a batch; Ring-A-Bell discrete: one "
              "genetic search per distinct prompt, shared by every model of a concept):", ""]
    lines += ["| concept | model | UnlearnDiffAtk | P4D soft | P4D hard | Ring-A-Bell discrete |", "|---|---|---|---|---|---|"]
    for concept, models in report["results"].items():
        for model, cells in models.items():
            def per(sc):
                a = (cells.get(sc) or {}).get("attack", {})
                if sc == "ring-a-bell-discrete":
                    v = a.get("search", {}).get("seconds_per_prompt")
                    return "-" if v is None else f"wall {v:.0f}"
                m = a.get("images_attacked")
                cost = a.get("cost") or {}
                if not m or "cpu_s" not in cost:
                    return "-"
                return f"{cost['cpu_s'] / m:.1f} / {cost['wall_s'] / m:.1f}"
            lines.append(f"| {concept} | {model} | {per('unlearndiffatk')} | {per('p4d-soft')} | {per('p4d-hard')} | "
                         f"{per('ring-a-bell-discrete')} |")
    return "\n".join(lines) + "\n"


def merge_cells(row: dict, other: dict) -> dict:
    """One cell from two samples of images: successes and images add up; the attack's budget lists and sums too."""
    from erasekit.metrics.crr import wilson_interval

    k, n = row["k"] + other["k"], row["n"] + other["n"]
    a, b = dict(row["attack"]), other["attack"]
    for key in ("images_attacked", "successes_before", "unet_evaluations", "optimisation_steps", "checks",
                "successes_in_loop"):
        if key in a and key in b:
            a[key] = a[key] + b[key]
    for key in ("timesteps_tried", "first_success_update", "first_success_timestep"):
        if key in a and key in b:
            a[key] = list(a[key]) + list(b[key])
    if "asr_before" in a and "asr_before" in b:
        a["asr_before"] = round((a["asr_before"] * row["n"] + b["asr_before"] * other["n"]) / n, 6)
    if "cost" in a and "cost" in b:
        a["cost"] = {c: a["cost"][c] + b["cost"][c] for c in ("wall_s", "cpu_s") if c in a["cost"] and c in b["cost"]}
    return dict(row, k=k, n=n, crr=k / n, ci=list(wilson_interval(k, n)), attack=a, samples=row.get("samples", 1) + 1)


def render_protocols(report: dict) -> list[str]:
    """UnlearnDiffAtk's two protocols side by side: budget used per attacked prompt."""
    import statistics

    lines = ["", f"UnlearnDiffAtk budget per attacked prompt (device {report.get('device', 'cpu')}): timestep blocks "
             "run (official: at most 50), median update of the first success among the prompts that succeeded in "
             "the loop, UNet evaluations (one per update's forward and backward, plus every image drawn), wall "
             "seconds.", "",
             "| concept | model | protocol | attacked | successes in loop | blocks run (mean) | first success "
             "(median update) | UNet evals / prompt | wall s / prompt |", "|---|---|---|---|---|---|---|---|---|"]
    for concept, models in report["results"].items():
        for model, cells in models.items():
            for sc, protocol in UDA_PROTOCOLS.items():
                a = (cells.get(sc) or {}).get("attack")
                if not a:
                    continue
                m = a.get("images_attacked") or 0
                if protocol == "official":
                    tried = a.get("timesteps_tried") or []
                    first = [u for u in a.get("first_success_update") or [] if u is not None]
                    blocks = f"{statistics.mean(tried):.1f}" if tried else "-"
                    med = f"{statistics.median(first):.0f}" if first else "-"
                    wins = str(a.get("successes_in_loop", 0))
                else:
                    blocks, med, wins = "-", "-", "-"
                cost = a.get("cost") or {}
                evals = f"{a['unet_evaluations'] / m:.0f}" if m else "-"
                wall = f"{cost['wall_s'] / m:.2f}" if m and "wall_s" in cost else "-"
                lines.append(f"| {concept} | {model} | {protocol} | {m} | {wins} | {blocks} | {med} | {evals} | "
                             f"{wall} |")
    return lines


if __name__ == "__main__":
    main()

"""What issue #10 still asks of the inference-time defences, beyond the defences-star bench preset's CRR table.

    nice python scripts/eval_defences_extra.py lambda [--n 64]     # dual_reconstruction lam sweep (embedded world)
    nice python scripts/eval_defences_extra.py cost                # CPU sampling cost + Frechet distance (embedded)
    python scripts/eval_defences_extra.py gpu --json OUT.json      # SD-1.4-shaped random pipeline on a GPU
    python scripts/eval_defences_extra.py gpu --quick              # tiny SD pipeline on CPU (a check of the code)

- ``lambda``: dual_reconstruction (concept star, threshold 5, replace, combine end) at each ``--lams`` value on the
  original toy model: CRR of latent-wb (star renders DDIM-inverted through the original model, regenerated with the
  empty prompt) and of text (the world's prompts naming star), n images each, toy detector P(star) > 0.5; and
  non-target accuracy: ``world.preservation_prompts("star")`` x ``--pres-seeds`` seeds, share whose detected shape
  is the prompt's. Writes a PNG (matplotlib, Agg) and a markdown table.
- ``cost``: one run; the same batch (``--batch`` preservation prompts, one seed each, 20 DDIM steps, guidance 5,
  batch size = the batch) generated plain and with each defence, ``--repeats`` times each (interleaved), median
  wall time and its CPU time (process_time; with several threads CPU time can exceed wall time); then, over a
  larger set (every preservation prompt x ``--fd-seeds`` seeds), the Frechet distance between the defended and the
  plain images of the same prompts and seeds, on the toy detector's penultimate features (``features``, 96-d, the
  input to its heads), through torchmetrics' FrechetInceptionDistance with that module as ``feature``; the floor
  is the plain model against itself on other seeds.
- ``gpu``: ``erasekit.models.tiny.sd14_shaped_pipeline()`` (random weights), fp16, 512x512, batch 8, DDIM, guidance
  7.5, prompt "a photo of a cat", plain and each defence with concept "a cat"; warm-up then median of
  ``--repeats``. Speed only: random weights say nothing about what the defences remove.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TOY_DEFENCES = {
    "sld": "sld:concept=star",
    "dual_reconstruction": "dual_reconstruction:concept=star",
    "irece": "irece:concept=star",
    "negative_prompt": "negative_prompt:text=star",
}


def _setup(threads: int):
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import torch

    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)


def _toy():
    from erasekit.detectors import create_detector
    from erasekit.diffusion import Target
    from erasekit.toy.pipeline import build_toy_pipeline, weights_available

    if not weights_available():
        sys.exit("the trained toy weights are not installed")
    pipe = build_toy_pipeline()
    return pipe, Target(pipe, model="toy"), create_detector("toy", concept="star")


def _pres_inputs(world, n_seeds: int, seed0: int = 0):
    pairs = world.preservation_prompts("star")
    labels = [l for l, _ in pairs for _ in range(n_seeds)]
    prompts = [p for _, p in pairs for _ in range(n_seeds)]
    seeds = [seed0 + s for _ in pairs for s in range(n_seeds)]
    return labels, prompts, seeds


def _pres_rate(detector, images, labels) -> dict:
    from erasekit.metrics import crr_summary

    rows = detector.score(images)
    s = crr_summary(r["labels"]["shape"] == label for r, label in zip(rows, labels))
    return {"rate": s["crr"], "ci": list(s["ci"]), "n": s["n"]}


def _pct(s: dict, key: str = "crr") -> str:
    return f"{100 * s[key]:.0f}% [{100 * s['ci'][0]:.0f}-{100 * s['ci'][1]:.0f}]"


# ----------------------------------------------------------------------------------------------------------- lambda
def cmd_lambda(args) -> None:
    from erasekit.attacks.scenarios import ScenarioConfig, run_scenario
    from erasekit.defences import parse_defence
    from erasekit.generation import generate

    pipe, base, detector = _toy()
    labels, prompts, seeds = _pres_inputs(base.world, args.pres_seeds)
    rows = []
    t0 = time.perf_counter()
    for lam in args.lams:
        target = base.with_defences(parse_defence(f"dual_reconstruction:concept=star,lam={lam}"))
        row = {"lam": lam}
        for scenario in ("latent-wb", "text"):
            settings = {} if scenario == "text" else {"ddim_inversion": {"prompt_mode": "empty"}}
            cfg = ScenarioConfig(scenario, "star", n=args.n, settings=settings)
            s = run_scenario(cfg, target, detector, args.out / f"lam{lam}" / scenario, cache_dir=args.out / "cache",
                             progress=False)
            row[scenario] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()
                             if k in ("crr", "ci", "n", "k")}
        images = generate(target, prompts, seeds, batch_size=32, progress=False)
        row["preservation"] = _pres_rate(detector, images, labels)
        rows.append(row)
        print(f"lam {lam}: latent-wb {_pct(row['latent-wb'])}, text {_pct(row['text'])}, "
              f"preservation {_pct(row['preservation'], 'rate')} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    wall = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lambda.json").write_text(json.dumps({"rows": rows, "wall_s": round(wall, 1)}, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = [r["lam"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, label, marker in (("latent-wb", "CRR latent-wb (original model)", "o"),
                               ("text", "CRR text prompts naming star", "s"),
                               ("preservation", "non-target accuracy (other shapes)", "^")):
        rk = "rate" if key == "preservation" else "crr"
        y = [100 * r[key][rk] for r in rows]
        lo = [100 * (r[key][rk] - r[key]["ci"][0]) for r in rows]
        hi = [100 * (r[key]["ci"][1] - r[key][rk]) for r in rows]
        ax.errorbar(lams, y, yerr=[lo, hi], marker=marker, capsize=3, label=label)
    ax.set_xlabel("lam (weight of the safety stream)")
    ax.set_ylabel("% of images")
    ax.set_ylim(-2, 102)
    ax.set_title("dual_reconstruction on the embedded world (concept star)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left")
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png)

    n_pres = rows[0]["preservation"]["n"]
    lines = [
        "## dual_reconstruction: the lam sweep", "",
        f"`nice python scripts/eval_defences_extra.py lambda --n {args.n}`; plot: `{args.png}`. Original toy "
        f"model, dual_reconstruction concept=star, threshold 5, safety_context replace, combine end, lam as given "
        f"(lam 0 installs nothing: the plain model). CRR: {args.n} images per cell, toy detector P(star) > 0.5, "
        f"Wilson 95% interval; latent-wb: star renders DDIM-inverted through the original model, regenerated with "
        f"the empty prompt; text: the world's prompts naming star. Non-target accuracy: {n_pres} images of the "
        f"world's preservation prompts ({args.pres_seeds} seeds each), share whose detected shape is the prompt's. "
        f"20 DDIM steps, guidance 5. Wall time {wall:.0f} s on a shared 2-core CPU.", "",
        "| lam | latent-wb CRR | text CRR | non-target accuracy |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['lam']:g} | {_pct(r['latent-wb'])} | {_pct(r['text'])} | {_pct(r['preservation'], 'rate')} |")
    text = "\n".join(lines) + "\n"
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(text)
    print(text)


# ------------------------------------------------------------------------------------------------------------- cost
def _feature_module():
    import torch
    from torch import nn

    from erasekit.toy.detector import load_toy_detector

    class Penultimate(nn.Module):
        """The toy detector up to its heads: (N, 3, H, W) images in [0, 1] (or uint8 0..255) -> (N, 96)."""

        def __init__(self):
            super().__init__()
            self.det = load_toy_detector()

        @torch.inference_mode()
        def forward(self, x):
            x = x.float()
            if x.dtype == torch.uint8 or x.max() > 1.5:
                x = x / 255.0
            return self.det.features(x * 2 - 1)

    return Penultimate()


def cmd_cost(args) -> None:
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    from erasekit.defences import parse_defence
    from erasekit.generation import generate
    from erasekit.toy.detector import to_tensor

    pipe, base, detector = _toy()
    targets = {"none": base} | {k: base.with_defences(parse_defence(v)) for k, v in TOY_DEFENCES.items()}
    _, prompts_all, _ = _pres_inputs(base.world, 2)
    prompts = (prompts_all * 2)[: args.batch]
    seeds = list(range(1000, 1000 + args.batch))
    run = lambda t: generate(t, prompts, seeds, steps=20, batch_size=args.batch, progress=False)  # noqa: E731
    for t in targets.values():  # warm-up (and each defence's one-time setup, e.g. encodings)
        generate(t, prompts[:2], seeds[:2], steps=6, batch_size=2, progress=False)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in targets}
    for rep in range(args.repeats):
        for name, t in targets.items():
            w, c = time.perf_counter(), time.process_time()
            run(t)
            times[name].append((time.perf_counter() - w, time.process_time() - c))
            print(f"rep {rep} {name}: {times[name][-1][0]:.2f} s wall, {times[name][-1][1]:.2f} s CPU", file=sys.stderr)
    timing = {}
    for name, tc in times.items():
        walls = [w for w, _ in tc]
        med = statistics.median(walls)
        cpu = tc[walls.index(med)][1] if med in walls else statistics.median(c for _, c in tc)
        timing[name] = {"wall_s": [round(w, 3) for w in walls], "cpu_s": [round(c, 3) for _, c in tc],
                        "median_wall_s": round(med, 3), "cpu_s_of_median": round(cpu, 3)}
    for name in timing:
        timing[name]["relative"] = round(timing[name]["median_wall_s"] / timing["none"]["median_wall_s"], 2)

    # damage: prompt following (preservation) and Frechet distance to the plain model's images
    labels, fprompts, fseeds = _pres_inputs(base.world, args.fd_seeds)
    images = {k: generate(t, fprompts, fseeds, batch_size=32, progress=False) for k, t in targets.items()}
    _, _, seeds_b = _pres_inputs(base.world, args.fd_seeds, seed0=10_000)
    floor_images = generate(base, fprompts, seeds_b, batch_size=32, progress=False)
    torch.manual_seed(0)
    fid = FrechetInceptionDistance(feature=_feature_module(), reset_real_features=False)
    fid.update(to_tensor(images["none"]), real=True)
    damage = {}
    for name, imgs in list(images.items()) + [("plain, other seeds (floor)", floor_images)]:
        fid.reset()
        fid.update(to_tensor(imgs), real=False)
        fd = float(fid.compute())
        pix = float(abs(imgs.astype("float32") - images["none"].astype("float32")).mean())
        damage[name] = {"frechet": round(fd, 4), "mean_abs_pixel_diff": round(pix, 2),
                        "preservation": _pres_rate(detector, imgs, labels)}
        print(f"{name}: FD {fd:.4f}, |dpixel| {pix:.2f}, pres {_pct(damage[name]['preservation'], 'rate')}",
              file=sys.stderr)
    n_fd = len(fprompts)
    out = {"settings": {"batch": args.batch, "steps": 20, "guidance": 5, "repeats": args.repeats,
                        "threads": args.threads, "fd_images": n_fd, "cpu": platform.processor() or platform.machine(),
                        "os_cpus": os.cpu_count(), "loadavg_start": args.loadavg, "loadavg_end": os.getloadavg()},
           "timing": timing, "damage": damage}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cost.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "## Cost and damage of each defence (embedded world)", "",
        f"`nice python scripts/eval_defences_extra.py cost` (one run). Timing: the same batch of {args.batch} "
        f"preservation prompts (one seed each), 20 DDIM steps, guidance 5, one batch of {args.batch}, "
        f"{args.threads} torch thread(s); each configuration {args.repeats} times, interleaved, after a warm-up; "
        "median wall time and the CPU time (process_time) of that repeat. The machine is a 2-core CPU shared with "
        f"other engineers' jobs (load average {args.loadavg[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at "
        "the end), so wall times carry their load: CPU time is the steadier figure. Defences at their defaults "
        "(concept star; negative_prompt text=star).", "",
        f"Damage: over {n_fd} images (every preservation prompt x {args.fd_seeds} seeds), the same prompts and "
        "seeds with and without the defence: Frechet distance of the toy detector's penultimate features (96-d, "
        "`ToyDetector.features`, the input to its heads) through torchmetrics' `FrechetInceptionDistance(feature="
        "<that module>)` (torchmetrics 1.9 was already installed; `pip install --dry-run torchmetrics` pulls "
        "neither torchvision nor torch-fidelity); the floor row is the plain model on other seeds (the distance "
        "that sampling noise alone gives at this n); mean absolute pixel difference (0-255) to the plain image of "
        "the same seed; preservation (detected shape = the prompt's).", "",
        "| defence | median wall (s) | CPU s of that run | relative wall | relative CPU | Frechet to plain | "
        "mean abs pixel diff | preservation |", "|---|---|---|---|---|---|---|---|"]
    cpu0 = timing["none"]["cpu_s_of_median"]
    for name, d in damage.items():
        t = timing.get(name)
        tcells = (f"{t['median_wall_s']:.2f} | {t['cpu_s_of_median']:.2f} | {t['relative']:.2f}x | "
                  f"{t['cpu_s_of_median'] / cpu0:.2f}x") if t else "- | - | - | -"
        lines.append(f"| {name} | {tcells} | {d['frechet']:.3f} | {d['mean_abs_pixel_diff']:.1f} | "
                     f"{_pct(d['preservation'], 'rate')} |")
    text = "\n".join(lines) + "\n"
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(text)
    print(text)


# -------------------------------------------------------------------------------------------------------------- gpu
def cmd_gpu(args) -> None:
    import torch

    from erasekit.defences import parse_defence
    from erasekit.diffusion import Target
    from erasekit.generation import generate
    from erasekit.models import tiny

    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    t = time.perf_counter()
    if args.quick:
        pipe = tiny.tiny_sd_pipeline("sd1")
    else:
        with torch.device(device):
            pipe = tiny.sd14_shaped_pipeline()
    pipe = pipe.to(device=device, dtype=dtype)
    build_s = time.perf_counter() - t
    concept = "a cat"
    specs = {"none": None, "sld": f"sld:concept={concept}", "dual_reconstruction": f"dual_reconstruction:concept={concept}",
             "irece": f"irece:concept={concept}", "negative_prompt": f"negative_prompt:text={concept}"}
    base = Target(pipe, model="sd14-shaped-random")
    steps = 6 if args.quick else args.steps
    batch = 2 if args.quick else args.batch
    prompts = ["a photo of a cat"] * batch
    seeds = list(range(batch))
    from erasekit.diffusion.vae import image_size

    h, w = image_size(pipe)
    report = {"setup": {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                        "torch": torch.__version__, "dtype": str(dtype), "height": h, "width": w, "steps": steps,
                        "batch": batch, "guidance": 7.5, "prompt": prompts[0], "repeats": args.repeats,
                        "scheduler": "DDIM", "build_s": round(build_s, 1), "weights": "random (sd14_shaped_pipeline)"},
              "results": {}}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")

    for name, spec in specs.items():
        try:
            target = base if spec is None else base.with_defences(parse_defence(spec))
            generate(target, prompts, seeds, steps=6, guidance=7.5, batch_size=batch, progress=False)
            walls = []
            for _ in range(args.repeats):
                sync()
                t = time.perf_counter()
                generate(target, prompts, seeds, steps=steps, guidance=7.5, batch_size=batch, progress=False)
                sync()
                walls.append(time.perf_counter() - t)
            r = {"spec": spec, "wall_s": [round(x, 3) for x in walls], "median_s": round(statistics.median(walls), 3)}
            if cuda:
                r["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                torch.cuda.reset_peak_memory_stats()
        except Exception as exc:  # noqa: BLE001  report and go on with the others
            r = {"spec": spec, "error": f"{type(exc).__name__}: {exc}"}
        report["results"][name] = r
        print(name, json.dumps(r), flush=True)
        save()
    plain = report["results"]["none"].get("median_s")
    for r in report["results"].values():
        if plain and "median_s" in r:
            r["relative"] = round(r["median_s"] / plain, 3)
            r["images_per_s"] = round(batch / r["median_s"], 2)
    save()
    print(json.dumps(report, indent=2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("lambda")
    a.add_argument("--n", type=int, default=64)
    a.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    a.add_argument("--pres-seeds", type=int, default=2)
    a.add_argument("--out", type=Path, default=Path("out/eval_defences_extra"))
    a.add_argument("--png", type=Path, default=Path("benchmarks/dual_reconstruction_lambda_sweep.png"))
    a.add_argument("--md", type=Path, default=Path("benchmarks/dual_reconstruction_lambda_sweep.md"))
    a.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("cost")
    c.add_argument("--batch", type=int, default=32)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--fd-seeds", type=int, default=8)
    c.add_argument("--out", type=Path, default=Path("out/eval_defences_extra"))
    c.add_argument("--md", type=Path, default=Path("benchmarks/defences_cost.md"))
    c.add_argument("--threads", type=int, default=1)
    g = sub.add_parser("gpu")
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--batch", type=int, default=8)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--json", type=Path, default=None)
    g.add_argument("--quick", action="store_true")
    g.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    args.loadavg = os.getloadavg()
    if args.cmd != "gpu" or args.quick:
        _setup(args.threads)
    {"lambda": cmd_lambda, "cost": cmd_cost, "gpu": cmd_gpu}[args.cmd](args)


if __name__ == "__main__":
    main()

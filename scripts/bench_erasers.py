"""Cost of each erasure method: solve seconds, wall seconds, peak memory, and ESD iterations per second.

    python scripts/bench_erasers.py --model toy                       # the embedded world, CPU
    python scripts/bench_erasers.py --model sd14-random --device cuda # SD-1.4-shaped random weights (860M UNet)
    python scripts/bench_erasers.py --model sd14-random --methods uce rece --device cpu

"solve" is the method's own work (the closed-form steps of UCE / RECE; sampling the training states plus the
fine-tuning loop of ESD); "wall" adds encoding the prompts and bookkeeping. Closed-form methods are timed
``--repeats`` times (median; the first run warms up). ESD runs ``--esd-iterations`` iterations (a rate, not a full
erasure) unless told otherwise. Peak RSS is the process high-water mark during the erase (it includes the
model); CUDA peak is ``torch.cuda.max_memory_allocated`` during it. Results: JSON on stdout (``--out`` to save).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

METHODS = ("uce", "rece", "esd-x", "esd-u")


def build(model: str, device: str):
    from erasekit.models import load_pipeline

    if model == "sd14-random":
        from erasekit.models.tiny import sd14_shaped_pipeline

        return sd14_shaped_pipeline(device=device)
    if model == "toy-random":
        from erasekit.toy.pipeline import build_toy_pipeline

        return build_toy_pipeline(None, device=device)
    return load_pipeline(model, device=device, dtype=torch.float32)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy", help="toy | toy-random | sd14-random | a diffusers folder / hub id")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--concept", default="star")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rece-epochs", type=int, default=3, help="RECE epochs (the issue's bar: 3 epochs < 1 s)")
    ap.add_argument("--esd-iterations", type=int, default=None, help="ESD iterations to time (default: 50 on the toy, 20 otherwise)")
    ap.add_argument("--esd-trajectories", type=int, default=None, help="ESD sampled trajectories (default: the method's)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from erasekit.erasers import erase
    from erasekit.worlds import is_toy_pipeline

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    t0 = time.perf_counter()
    pipe = build(args.model, device)
    build_s = time.perf_counter() - t0
    toy = is_toy_pipeline(pipe)
    report = {
        "model": args.model, "device": device, "threads": torch.get_num_threads(),
        "machine": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine(),
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()), "build_s": round(build_s, 1),
        "torch": torch.__version__, "methods": {},
    }
    for method in args.methods:
        settings = {}
        if method == "rece":
            settings["epochs"] = args.rece_epochs
        if method.startswith("esd"):
            settings["iterations"] = args.esd_iterations or (50 if toy else 20)
            if args.esd_trajectories:
                settings["trajectories"] = args.esd_trajectories
            elif not toy:
                settings["trajectories"] = 4  # only a rate is measured; sampling cost is reported apart
        repeats = args.repeats if method in ("uce", "rece") else 1
        runs = []
        for _ in range(repeats):
            edit = erase(pipe, method, args.concept, settings=settings, progress=sys.stderr.isatty())
            runs.append(edit.timings)
        row = {
            "solve_s": round(statistics.median(r["solve_s"] for r in runs), 4),
            "wall_s": round(statistics.median(r["wall_s"] for r in runs), 4),
            "solve_s_runs": [r["solve_s"] for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] or 0 for r in runs),
            "cuda_peak_mb": max((r["cuda_peak_mb"] or 0) for r in runs) or None,
            "tensors": len(edit.tensors), "delta_mb": round(edit.n_bytes() / 2**20, 2),
            "settings": {k: edit.settings[k] for k in settings},
        }
        if method.startswith("esd"):
            row.update({k: edit.extra[k] for k in ("iterations_per_s", "sampling_s", "training_s", "training_states",
                                                    "trained_parameters")})
            row["note"] = "solve_s = sampling_s (frozen-model trajectories) + training_s (the timed iterations)"
        report["methods"][method] = row
        print(f"{method:<6} solve {row['solve_s']:.4f} s  wall {row['wall_s']:.3f} s  peak RSS {row['peak_rss_mb']:.0f} MB"
              + (f"  CUDA {row['cuda_peak_mb']:.0f} MB" if row["cuda_peak_mb"] else "")
              + (f"  {row['iterations_per_s']} it/s" if "iterations_per_s" in row else ""), file=sys.stderr)
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()

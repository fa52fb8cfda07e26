"""``scripts/bench_gpu.py --bench``: the whole `erasekit bench` on an SD-1.4-shaped random pipeline, stage by stage,
against standalone ``generate --fast`` measured in the same run (issue 23).

    python scripts/bench_gpu.py --bench --out benchmarks/bench_gpu_bench_h200.json            # one GPU
    python scripts/bench_gpu.py --bench --bench-before --out ...                              # + the old path
    python scripts/bench_gpu.py --bench --quick                                               # tiny, CPU check

Phases, each in its own Python process (so that a compiled graph is never reused from memory, only from the disk
cache under test), each skipped when its result is already in ``--work`` (default runs/bench-gpu, git-ignored; a
command cut short by a time limit is run again and continues):

- ``model``: the random pipeline built on the GPU (fp16) and saved (safetensors) to ``WORK/model``;
- ``reference``: ``generate(fast=True)`` at batch 64, n = 128 (after its compilation; its own inductor cache);
- ``bench1``: the bench (`BENCH_CONFIG`: original, UCE, RECE, RECE + IRECE; the five scenarios; 32 images a cell;
  textual inversion 200 steps; 50 DDIM steps, CFG 7.5; batch 64) into a fresh folder with an empty inductor cache;
- ``bench2``: the same bench into another fresh folder with ``bench1``'s inductor cache: its compile seconds and the
  cache's hits and misses (a miss is a graph compiled again);
- ``before`` (``--bench-before``): the old path: per-cell batches, no disk cache (an empty one), fresh folder.

``--phases model,reference,bench1`` runs a subset (one command's time limit; a later command with
``--phases bench2,before`` and the same ``--work`` continues: keep the machine warm in between, the work folder
and its caches live there). ``--quick`` compiles with aot_eager (seconds) unless ``BENCH_BACKEND=inductor``.

Per run: wall seconds and images/s (or rows/s) of every stage (edits, attacks, generation, scoring; from the
bench's costs.jsonl), UNet evaluations per second, the generation stage's compilation, its images/s as a share of
the reference. Every figure is written to ``--out`` as soon as it is known.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CONCEPT = "star"
STAGES = ("edits", "attacks", "generation", "scoring")
ALL_PHASES = ("model", "reference", "bench1", "bench2", "before")


def bench_config(work: Path, quick: bool, fast) -> dict:
    """The fixed config (``quick``: tiny shapes and budgets for a CPU check)."""
    return {
        "description": "issue 23: SD-1.4-shaped random pipeline; the bench at the speed of standalone generation",
        "model": str(work / "model"),
        "concepts": [{"name": CONCEPT, "images": str(work / "concept_images")}],
        "methods": ["original", {"name": "uce"}, {"name": "rece"},
                    {"name": "rece+irece", "edit": "rece", "defences": ["irece"]}],
        "scenarios": ["text", "embedding-bb", "embedding-wb", "latent-bb", "latent-wb"],
        "images_per_cell": 4 if quick else 32,
        "sampler": {"steps": 3 if quick else 50, "guidance": 7.5},
        "detector": {"name": "toy"},  # scores the concept on 32x32 downsamples: random weights, CRR means nothing
        "batch_size": 4 if quick else 64,
        "attacks": {"ti": {"steps": 2 if quick else 200}},
        "preservation": {"enabled": False},
        "dtype": "float32" if quick else "float16",
        "fast": fast,
    }


# -- phases (each in a fresh process) --------------------------------------------------------------------------------
def phase_model(work: Path, quick: bool) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from erasekit.models import tiny
    from erasekit.worlds.toy import render_concept_images

    t = time.perf_counter()
    cuda = torch.cuda.is_available() and not quick
    if quick:
        pipe = tiny.tiny_sd_pipeline("sd1")
    else:
        with torch.device("cuda" if cuda else "cpu"):  # random init on the GPU: seconds instead of minutes
            pipe = tiny.sd14_shaped_pipeline()
        pipe.to(dtype=torch.float16)
    built = time.perf_counter() - t
    pipe.save_pretrained(str(work / "model.tmp"), safe_serialization=True)
    os.replace(work / "model.tmp", work / "model")
    folder = work / "concept_images"
    folder.mkdir(exist_ok=True)
    images, _ = render_concept_images(CONCEPT, 32, 64, seed=0)  # resized to the model's size when loaded
    for i, im in enumerate(images):
        Image.fromarray(np.asarray(im)).save(folder / f"{CONCEPT}-{i:02d}.png")
    return {"build_s": round(built, 1), "save_s": round(time.perf_counter() - t - built, 1),
            "parameters": sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())}


def _device_dtype(quick: bool):
    import torch

    cuda = torch.cuda.is_available() and not quick
    return ("cuda" if cuda else "cpu"), (torch.float16 if cuda else torch.float32)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def phase_reference(work: Path, quick: bool) -> dict:
    """``generate --fast`` at batch 64, n = 128 (quick: 4 and 8): the figure the bench's generation is held to."""
    from erasekit.diffusion.speed import SpeedOptions, accelerate, compile_delta, compile_stats, use_compile_cache
    from erasekit.generation import generate
    from erasekit.models import load_pipeline

    device, dtype = _device_dtype(quick)
    use_compile_cache(work / "cache_reference")
    pipe = load_pipeline(str(work / "model"), device=device, dtype=dtype)
    batch, n, steps = (4, 8, 3) if quick else (64, 128, 50)
    accelerate(pipe, SpeedOptions(backend=os.environ.get("BENCH_BACKEND", "inductor")))
    before = compile_stats()
    t = time.perf_counter()
    generate(pipe, "a photo of a star", list(range(batch)), steps=2, guidance=7.5, batch_size=batch, progress=False,
             fast=True)
    _sync()
    first = time.perf_counter() - t
    t = time.perf_counter()
    generate(pipe, "a photo of a star", list(range(n)), steps=steps, guidance=7.5, batch_size=batch, progress=False,
             fast=True)
    _sync()
    wall = time.perf_counter() - t
    return {"images_per_s": round(n / wall, 3), "images": n, "batch": batch, "steps": steps, "wall_s": round(wall, 2),
            "unet_rows_per_s": round(n * steps * 2 / wall, 1),  # CFG: two rows an image-step
            "first_call_s": round(first, 1), "compile": compile_delta(before, compile_stats())}


def phase_bench(work: Path, quick: bool, name: str, fast, before: bool) -> dict:
    import torch

    from erasekit.bench.run import run_bench
    from erasekit.bench.spec import parse_config
    from erasekit.jsonl import read_jsonl

    raw = bench_config(work, quick, fast)
    if before:  # the old path: per-cell batches, compiled without the shared cache (an empty one of its own)
        import shutil

        shutil.rmtree(work / f"cache_{name}", ignore_errors=True)
        raw.update(batching="cell", compile_cache=str(work / f"cache_{name}"))
    else:
        raw["compile_cache"] = str(work / "cache_bench")
    cfg = parse_config(raw, "bench_gpu --bench config")
    out = work / f"run_{name}"
    if out.exists():  # a run cut short: a fresh folder again (a resumed one would measure less work)
        import shutil

        shutil.rmtree(out)
    if os.environ.get("BENCH_BACKEND"):  # CPU checks: another backend, installed before the bench compiles
        from erasekit.diffusion.speed import SpeedOptions, accelerate, use_compile_cache
        from erasekit.models import load_pipeline

        use_compile_cache(cfg.compile_cache)
        device, dtype = _device_dtype(quick)
        pipe = load_pipeline(cfg.model, device=device, dtype=dtype)
        accelerate(pipe, SpeedOptions(backend=os.environ["BENCH_BACKEND"]))
    else:
        pipe = None
    from erasekit.diffusion.speed import compile_delta, compile_stats

    compiled = compile_stats()
    t = time.perf_counter()
    summary = run_bench(cfg, out, progress=False, log=print, pipeline=pipe)
    wall = time.perf_counter() - t
    compiled = compile_delta(compiled, compile_stats())
    rows = [r for r in read_jsonl(out / "costs.jsonl") if r.get("run") == summary["last_run"]["id"]]
    stages = {}
    for r in rows:
        if r["stage"] not in STAGES and r["stage"] not in ("quality", "report"):
            continue
        entry = {"wall_s": round(r.get("wall_s") or 0, 2), "cpu_s": round(r.get("cpu_s") or 0, 2),
                 "unet_evals": r.get("unet_evals")}
        if r["stage"] == "generation":
            entry.update(images=r.get("images"), images_per_s=round((r.get("images") or 0) / max(r["wall_s"], 1e-9), 3),
                         fast=r.get("fast"), batching=r.get("batching"), compile=r.get("compile"))
            # where the stage's time went: one model state (and sampler group) a row; the first batch of the first
            # group pays the compilation
            entry["groups"] = [{"cells": g.get("cells"), "images": g["images"], "batch": g["batch"],
                                "batches": g["batches"], "images_run": g.get("images_run"),
                                "unet_evals": g.get("unet_evals"), "wall_s": g["wall_s"],
                                "first_batch_s": g.get("first_batch_s"),
                                "images_per_s": round(g["images"] / max(g["wall_s"], 1e-9), 3),
                                "unet_evals_per_s": round((g.get("unet_evals") or 0) / max(g["wall_s"], 1e-9), 1)}
                               for g in r.get("groups") or []]
        if r["stage"] == "scoring":
            entry.update(rows=r.get("rows_scored"), rows_per_s=round((r.get("rows_scored") or 0) / max(r["wall_s"], 1e-9), 1))
        if r.get("unet_evals") and r.get("wall_s"):
            entry["unet_evals_per_s"] = round(r["unet_evals"] / r["wall_s"], 1)
        stages[r["stage"]] = entry
    return {"wall_s": round(wall, 1), "folder": str(out), "stages": stages, "compile_whole_run": compiled,
            "images": summary.get("images"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not quick else "cpu"}


PHASES = {"model": phase_model, "reference": phase_reference}


def run_phase(argv: list[str]) -> None:
    """Child process: ``--bench-phase NAME WORK QUICK FAST BEFORE`` -> WORK/NAME.json."""
    name, work, quick, fast, before = argv
    work, quick, before = Path(work), quick == "1", before == "1"
    fast = {"true": True, "false": False}.get(fast, fast)
    if quick:
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    result = (PHASES[name](work, quick) if name in PHASES else
              phase_bench(work, quick, name, fast, before))
    tmp = work / f"{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, work / f"{name}.json")


def main(args, rep) -> None:
    """Parent: the phases in order, each in a child process; merged into ``rep`` (--out) as each ends."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    quick = "1" if args.quick else "0"
    fast = args.bench_fast
    phases = ["model", "reference", "bench1", "bench2"] + (["before"] if args.bench_before else [])
    if args.phases:  # a subset (a command's time limit): the others must be done already or come later
        wanted = args.phases.split(",")
        unknown = set(wanted) - set(phases) - {"before"}
        if unknown:
            sys.exit(f"unknown phase(s) {sorted(unknown)}; phases: model, reference, bench1, bench2, before")
        phases = [p for p in ALL_PHASES if p in wanted]
    rep.put("bench_setup", {"work": str(work), "quick": args.quick, "fast": fast, "phases": phases,
                            "config": bench_config(work, args.quick, fast)})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    if args.quick:
        env.setdefault("ERASEKIT_THREADS", os.environ.get("BENCH_THREADS", "1"))
        # inductor compiles for minutes on a small CPU: aot_eager (dynamo's graphs, no code generation) unless
        # BENCH_BACKEND=inductor asks for the disk cache's own check (the second bench's cache hits)
        env.setdefault("BENCH_BACKEND", "aot_eager")
    for name in ALL_PHASES:  # what this command asks for, run; what any command finished, reported
        result_path = work / f"{name}.json"
        if name in phases and not result_path.is_file():
            t = time.perf_counter()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--bench-phase", name, str(work), quick, str(fast),
                   "1" if name == "before" else "0"]
            done = subprocess.run(cmd, env=env)
            if done.returncode != 0:
                rep.put(f"bench_{name}", {"failed": done.returncode, "after_s": round(time.perf_counter() - t, 1)})
                return
        if result_path.is_file():
            rep.put(f"bench_{name}", json.loads(result_path.read_text()))
    if not (work / "reference.json").is_file():
        return
    ref = json.loads((work / "reference.json").read_text())
    overview = {"reference_generate_fast_images_per_s": ref["images_per_s"]}
    for name in ("bench1", "bench2", "before"):
        if not (work / f"{name}.json").is_file():
            continue
        r = json.loads((work / f"{name}.json").read_text())
        gen = r["stages"].get("generation", {})
        overview[name] = {"wall_s": r["wall_s"], "generation_images_per_s": gen.get("images_per_s"),
                          "generation_share_of_reference": round(gen.get("images_per_s", 0) / ref["images_per_s"], 3),
                          # the stage without its compilation (a cold cache's first run pays it once)
                          "generation_images_per_s_after_compile": round((gen.get("images") or 0) / max(
                              gen.get("wall_s", 0) - ((gen.get("compile") or {}).get("compile_s") or 0), 1e-9), 3),
                          # IRECE's cells add UNet calls of their own (its mask): rows/s is the like-for-like
                          "generation_unet_evals_per_s": gen.get("unet_evals_per_s"),
                          "generation_unet_evals_share_of_reference": round(
                              (gen.get("unet_evals_per_s") or 0) / ref["unet_rows_per_s"], 3),
                          "compile_s": (gen.get("compile") or {}).get("compile_s"),
                          "graphs_compiled": (gen.get("compile") or {}).get("graphs"),
                          "fx_graph_cache": [(gen.get("compile") or {}).get("fx_graph_cache_hit"),
                                             (gen.get("compile") or {}).get("fx_graph_cache_miss")],
                          "stages_wall_s": {k: v["wall_s"] for k, v in r["stages"].items()}}
    if "bench1" in overview and "before" in overview:
        overview["wall_before_over_after"] = round(overview["before"]["wall_s"] / overview["bench1"]["wall_s"], 3)
    rep.put("bench_overview", overview)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--bench-phase":
    run_phase(sys.argv[2:])

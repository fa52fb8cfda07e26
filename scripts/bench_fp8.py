"""FP8 against the default-precision fast path on the same jobs, in one run on one GPU (issue 23, item 3).

    python scripts/bench_fp8.py --out benchmarks/gpu_h200_fp8.json      # the embedded world, then SD-1.4's shape
    python scripts/bench_fp8.py --variants default,fp8,fp8-conv --out ...  # the 3x3 convolutions too (+2 min)
    python scripts/bench_fp8.py --quick --out /tmp/fp8_quick.json       # CPU check: tiny pipelines, FP8 through the
                                                                        # CPU's torch._scaled_mm (no speed meaning)

1. CRR (run first: a minute), the embedded world (erasekit's default toy world, on the same GPU): the original
   model and a UCE edit of ``--concept`` (closed form, computed in float32, applied to the ``--dtype`` weights), the
   text scenario (`erasekit.attacks.scenarios.run_scenario`), ``--toy-n`` images a cell, default fast against each
   FP8 precision on the same prompts and seeds: each cell's CRR, the difference, images whose detector verdict
   flips, pixel differences. The fast path runs eager here (``--toy-compile`` compiles): the FP8 products are the
   same kernels either way, and the toy UNet is far too small for compilation to matter.
2. Speed and pixels, SD-1.4-shaped random pipeline (`erasekit.models.tiny.sd14_shaped_pipeline`, built on the GPU),
   512x512, 50 DDIM steps, CFG 7.5, batch 64, ``--dtype`` float16 (what ``--fast`` runs on CUDA). Per variant
   (``default``: ``generate(fast=True)``; ``fp8``: ``generate(fast="fp8")``, `erasekit.diffusion.fp8`; ``fp8-conv``:
   the 3x3 convolutions too, experimental; ``fp8-torchao``: the linear layers through torchao's float8 recipe, on a
   second pipeline of the same seed): the compilation (first call: 2 steps at the batch), images/s over ``--n``
   images, the UNet alone (ms per call on a recorded generation call, the equivalent TFLOP/s of the counted FLOPs),
   and against ``default`` on the same prompts and seeds the uint8 pixel difference (max, mean, 99th percentile,
   share over 8 levels, PSNR). Random weights make speed meaningful and pixels comparable, but no detector can judge
   such images: the CRR is section 1's.

Every figure is written to ``--out`` as soon as it is measured (a run cut short keeps what it has).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PROMPTS = ["a photo of a red car on a street", "a watercolor painting of a lighthouse at dusk",
           "a portrait of an old man with a beard", "a bowl of fruit on a wooden table"]
VARIANTS = ("default", "fp8", "fp8-conv", "fp8-torchao")  # the precisions (`erasekit.diffusion.fp8.FP8_MODES`)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Report:
    def __init__(self, path: Path | None):
        self.path, self.data = path, {}
        self.t0 = time.time()

    def put(self, key, value):
        self.data[key] = value
        print(f"[{time.time() - self.t0:7.1f}s] {key}: {json.dumps(value)}", flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def timed(fn):
    sync()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return out, time.perf_counter() - t, time.process_time() - c


def pixel_diff(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    mse = (d.astype(np.float64) ** 2).reshape(len(d), -1).mean(1)
    psnr = 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))
    return {"max_abs_uint8": int(d.max()), "mean_abs_uint8": round(float(d.mean()), 4),
            "p99_abs_uint8": int(np.percentile(d, 99)), "share_over_8_levels": round(float((d > 8).mean()), 5),
            "psnr_db_mean": round(float(psnr.mean()), 2), "psnr_db_min": round(float(psnr.min()), 2),
            "images": int(len(d))}


def speed_options(variant: str, args):
    from erasekit.diffusion.speed import SpeedOptions

    if args.quick:  # the compiled graph's tracing without inductor's code generation: seconds on a CPU
        return SpeedOptions(precision=variant, fp8_any_device=True, backend="aot_eager")
    return SpeedOptions(precision=variant)


def fast_value(variant: str):
    return variant if variant != "default" else True


class CallRecorder:
    """Keeps the first call's arguments of a fast UNet's compiled module, to replay it with the very tensors
    generation gave it (same shapes, strides, dtypes: no recompilation)."""

    def __init__(self, fast_unet):
        self.fast_unet, self.inner, self.call = fast_unet, fast_unet.compiled, None
        fast_unet.compiled = self

    def __call__(self, *args, **kwargs):
        if self.call is None:
            self.call = (args, kwargs)
        return self.inner(*args, **kwargs)

    def close(self):
        self.fast_unet.compiled = self.inner


def unet_ms(fast_unet, call, iters: int) -> float:
    """Milliseconds per fast UNet call (its FP8 refresh and flag included), on a recorded generation call."""
    (x, t), kwargs = call[0][:2], dict(call[1])
    with torch.inference_mode():
        fast_unet(x, t, **kwargs)
        _, wall, _ = timed(lambda: [fast_unet(x, t, **kwargs) for _ in range(iters)])
    return wall / iters * 1000


def unet_flops(pipe, height, width) -> float:
    """FLOPs of one UNet forward for one sample (counted on the eager UNet, outside any FP8 call)."""
    from torch.utils.flop_counter import FlopCounterMode

    from erasekit.diffusion.family import family_of

    unet = pipe.unet
    f = pipe.vae_scale_factor
    cond = family_of(pipe).encode(pipe, [PROMPTS[0]], device=unet.device, size=(height, width)).to(unet.device,
                                                                                                   unet.dtype)
    x = torch.zeros(1, unet.config.in_channels, height // f, width // f, device=unet.device, dtype=unet.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor(500, device=unet.device), **cond.unet_kwargs())
    return float(counter.get_total_flops())


def sd14_section(args, rep, device, dtype):
    from erasekit.diffusion.speed import accelerate
    from erasekit.diffusion.vae import image_size
    from erasekit.generation import generate
    from erasekit.models import tiny
    from erasekit.models.fingerprint import fingerprint

    def build():
        if args.quick:
            return tiny.tiny_sd_pipeline("sd1").to(device=device, dtype=dtype)
        with torch.device(device):  # random init on the GPU: seconds instead of minutes
            pipe = tiny.sd14_shaped_pipeline()
        return pipe.to(device=device, dtype=dtype)

    t = time.perf_counter()
    pipe = build()
    height, width = image_size(pipe)
    steps, batch, n = args.steps, args.batch, args.n
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    seeds = list(range(n))
    base_fp = fingerprint(pipe)
    flops = unet_flops(pipe, height, width)
    rep.put("sd14_setup", {"model": "tiny sd1 (quick)" if args.quick else "SD-1.4-shaped random weights",
                           "height": height, "width": width, "steps": steps, "guidance": args.guidance,
                           "batch": batch, "n": n, "dtype": str(dtype), "prompts": PROMPTS, "seeds": [0, n - 1],
                           "build_s": round(time.perf_counter() - t, 1), "fingerprint": base_fp,
                           "unet_gflop_per_sample": round(flops / 1e9, 1)})
    from erasekit.diffusion.fp8 import FP8_MODES

    images, rates = {}, {}
    converted = None  # the FP8 backend this pipeline's UNet was converted to
    for variant in args.variants:
        backend = FP8_MODES[variant][0] if variant in FP8_MODES else None
        if backend is not None and converted not in (None, backend):
            # one UNet computes FP8 through one backend: a second pipeline, same seed, same weights (checked)
            del pipe
            if device == "cuda":
                torch.cuda.empty_cache()
            pipe = build()
            if fingerprint(pipe) != base_fp:
                rep.put(f"sd14_{variant}", {"error": "the rebuilt pipeline's weights differ; not compared"})
                continue
        converted = backend or converted
        try:
            fast_unet = accelerate(pipe, speed_options(variant, args))
        except Exception as exc:  # noqa: BLE001 - one variant failing must not lose the others
            rep.put(f"sd14_{variant}", {"error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        fv = fast_value(variant)
        entry = {"precision": variant, "fp8_backend": backend,
                 "fp8_layers": len(fast_unet.fp8.layers) if fast_unet.fp8 is not None else 0}
        recorder = CallRecorder(fast_unet)
        try:
            _, wall, cpu = timed(lambda: generate(pipe, prompts[:batch], seeds[:batch], steps=2,
                                                  guidance=args.guidance, batch_size=batch, progress=False, fast=fv))
            recorder.close()
            entry["compile_first_call_s"] = round(wall, 1)
            entry["compile_cpu_s"] = round(cpu, 1)
            imgs, wall, cpu = timed(lambda: generate(pipe, prompts, seeds, steps=steps, guidance=args.guidance,
                                                     batch_size=batch, progress=False, fast=fv))
        except Exception as exc:  # noqa: BLE001
            recorder.close()
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
            rep.put(f"sd14_{variant}", entry)
            continue
        images[variant] = imgs
        rates[variant] = n / wall
        entry.update(images_per_s=round(n / wall, 3), images=n, wall_s=round(wall, 2), cpu_s=round(cpu, 2),
                     unet_calls=fast_unet.calls)
        if device == "cuda":
            entry["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if "unet" not in args.skip and recorder.call is not None:
            rows = int(recorder.call[0][0].shape[0])
            ms = unet_ms(fast_unet, recorder.call, 2 if args.quick else 10)
            entry["unet_ms_per_call"] = round(ms, 2)
            entry["unet_rows_per_call"] = rows
            entry["unet_equivalent_tflops"] = round(flops * rows / (ms / 1000) / 1e12, 1)
        recorder.call = None
        if variant != "default" and "default" in images:
            entry["vs_default"] = pixel_diff(images["default"], imgs)
            entry["speedup_vs_default"] = round(rates[variant] / rates["default"], 3)
        rep.put(f"sd14_{variant}", entry)
    del pipe, images
    if device == "cuda":
        torch.cuda.empty_cache()
    return rates


def toy_section(args, rep, device, dtype):
    from erasekit.attacks.scenarios import ScenarioConfig, run_scenario
    from erasekit.diffusion import Target
    from erasekit.diffusion.speed import SpeedOptions, accelerate
    from erasekit.erasers import erase
    from erasekit.jsonl import read_jsonl
    from erasekit.models import load_pipeline
    from erasekit.models.fingerprint import fingerprint
    from erasekit.scoring import SCORES_FILE
    from erasekit.worlds import world_of

    t = time.perf_counter()
    pipe = load_pipeline("toy", device=device, dtype=torch.float32)
    world = world_of(pipe)
    concept = args.concept
    edit = erase(pipe, "uce", concept)  # closed form on the float32 weights, as `erasekit erase` makes it
    base = fingerprint(pipe)
    pipe.to(dtype=dtype)
    original = Target(pipe, model="toy", world=world, base_fingerprint=base)
    targets = {"original": original, "uce": original.with_edits(edit)}
    detector = world.detector(concept)
    rep.put("toy_setup", {"concept": concept, "n_per_cell": args.toy_n, "dtype": str(dtype), "scenario": "text",
                          "methods": list(targets), "compiled": bool(args.toy_compile),
                          "setup_s": round(time.perf_counter() - t, 1),
                          "note": "on the device the text encoder's weights are the float16 stand-in (.carry)"})
    work = Path(tempfile.mkdtemp(prefix="bench_fp8_toy_"))
    opts = dict(compile=bool(args.toy_compile), fp8_any_device=args.quick)
    if args.quick:
        opts["backend"] = "aot_eager"
    variants = [v for v in ("default", "fp8", "fp8-conv") if v in args.variants]  # torchao: one backend a UNet
    cells = {}
    for variant in variants:
        accelerate(pipe, SpeedOptions(**opts), precision=variant)
        for method, target in targets.items():
            out = work / f"{variant}-{method}"
            cfg = ScenarioConfig(scenario="text", concept=concept, n=args.toy_n, seed=0, batch_size=args.toy_batch,
                                 fast=fast_value(variant))
            summary, wall, _ = timed(lambda: run_scenario(cfg, target, detector, out, progress=False))
            rows = {(r["prompt"], r["seed"]): r for r in read_jsonl(out / SCORES_FILE)}
            index = {(r["prompt"], r["seed"]): r for r in read_jsonl(out / "images.jsonl")}
            cells[(variant, method)] = (summary, rows, index, out)
            rep.put(f"toy_{variant}_{method}", {"crr": summary["crr"], "ci": summary["ci"], "n": summary["n"],
                                                "k": summary["k"], "invalid": summary.get("invalid"),
                                                "mean_score": summary.get("mean_score"), "wall_s": round(wall, 2),
                                                "precision": variant})
    from PIL import Image

    for variant, method in [(v, m) for v in variants[1:] for m in targets]:
        s0, rows0, idx0, out0 = cells[("default", method)]
        s1, rows1, idx1, out1 = cells[(variant, method)]
        common = sorted(set(rows0) & set(rows1))
        flips = [k for k in common if bool(rows0[k]["present"]) != bool(rows1[k]["present"])]
        a = np.stack([np.asarray(Image.open(out0 / idx0[k]["path"]).convert("RGB")) for k in common])
        b = np.stack([np.asarray(Image.open(out1 / idx1[k]["path"]).convert("RGB")) for k in common])
        score_d = [abs(float(rows0[k]["score"]) - float(rows1[k]["score"])) for k in common]
        rep.put(f"toy_{method}_{variant}_vs_default", {
            "crr_default": s0["crr"], f"crr_{variant}": s1["crr"],
            "crr_difference": None if s0["crr"] is None or s1["crr"] is None else round(s1["crr"] - s0["crr"], 4),
            "paired_images": len(common), "verdict_flips": len(flips),
            "flips_to_present": sum(bool(rows1[k]["present"]) for k in flips),
            "score_abs_diff_mean": round(float(np.mean(score_d)), 5), "score_abs_diff_max": round(max(score_d), 5),
            "pixels": pixel_diff(a, b)})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny pipelines on the CPU, FP8 through the CPU's kernels")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--n", type=int, default=None, help="SD-1.4 images per variant (default: one batch)")
    ap.add_argument("--variants", default="default,fp8",
                    help="comma-separated: default, fp8, fp8-conv (3x3 convolutions too), fp8-torchao")
    ap.add_argument("--concept", default="star")
    ap.add_argument("--toy-n", type=int, default=None, help="embedded-world images per cell")
    ap.add_argument("--toy-batch", type=int, default=256)
    ap.add_argument("--toy-compile", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated: sd14, unet, toy")
    args = ap.parse_args(argv)
    args.variants = list(dict.fromkeys(v for v in args.variants.split(",") if v))
    args.variants.sort(key=lambda v: v != "default")  # default first: every other variant is compared with it
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or "default" not in args.variants:
        sys.exit(f"--variants: give default and any of {', '.join(VARIANTS)} (got {args.variants})")
    args.skip = set(filter(None, args.skip.split(",")))
    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    args.steps = args.steps or (2 if args.quick else 50)
    args.batch = args.batch or (2 if args.quick else 64)
    args.n = args.n or args.batch
    args.toy_n = args.toy_n or (8 if args.quick else 1024)
    if args.quick:
        args.toy_batch = min(args.toy_batch, 8)
    rep = Report(args.out)
    from erasekit.diffusion.fp8 import fp8_supported

    fp8_ok, what = fp8_supported(device)
    rep.put("setup", {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                      "capability": list(torch.cuda.get_device_capability()) if cuda else None,
                      "fp8_supported": fp8_ok, "fp8_device": what, "torch": torch.__version__,
                      "cuda": torch.version.cuda, "variants": args.variants, "quick": args.quick})
    if not fp8_ok and not args.quick:
        rep.put("error", f"no FP8 tensor cores here ({what}); --quick runs the CPU check")
        return
    if "toy" not in args.skip:  # first: a minute at most, and the CRR figures survive a run cut short later
        toy_section(args, rep, device, dtype)
    if "sd14" not in args.skip:
        sd14_section(args, rep, device, dtype)
    rep.put("total_s", round(time.time() - rep.t0, 1))


if __name__ == "__main__":
    main()

"""GPU generation speed, in one run on one machine: plain diffusers against erasekit (eager and compiled).

    python scripts/bench_gpu.py --model sd14 --out benchmarks/gpu_h100_sd14.json     # SD-1.4-shaped, 512x512
    python scripts/bench_gpu.py --model sdxl --out benchmarks/gpu_h100_sdxl.json     # SDXL-shaped, 1024x1024
    python scripts/bench_gpu.py --quick                                              # tiny shapes (CPU check)
    python scripts/bench_gpu.py --model flux-dev-shape --out benchmarks/gpu_h200_flux_dev_shape.json  # FLUX.1-dev
    python scripts/bench_gpu.py --model sd35m-shape --out benchmarks/gpu_h200_sd35m_shape.json        # SD3.5-medium
                                                         # (both 1024x1024 bf16: scripts/bench_gpu_flow.py)
    python scripts/bench_gpu.py --bench --out benchmarks/bench_gpu_bench.json   # the whole `erasekit bench`, per
                                                         # stage, against generate --fast (scripts/bench_gpu_bench.py)

Random weights with the real models' shapes (`erasekit.models.tiny`): speed does not depend on the weights.
Measured, each after a warm-up (and, for the compiled path, after its one compilation, reported separately):

- plain diffusers ``pipe(prompt=[p] * B)`` at batch 1 and 32 (SDXL: 1 and 8), DDIM, CFG, fp16;
- erasekit ``generate`` eager and ``generate(fast=True)`` (`erasekit.diffusion.speed`: channels-last, the UNet
  and the VAE decoder compiled, tuned inductor kernels, cuDNN autotuning; ``--fast-options`` switches parts off), the same
  prompts, steps and guidance; the largest pixel difference between the two (uint8 levels) is recorded;
- UNet TFLOP/s (FLOPs per sample counted by torch's FlopCounterMode, eager and compiled at the generation batch),
  and the images/s ceiling if the UNet ran at the GPU's peak (``--peak-tflops``, 790: the bf16 product measured on
  these H100s);
- DDIM inversion images/s (fp16, eager and compiled), textual inversion steps/s (batch 4, float32 weights, bf16
  autocast and plain float32).

Every figure is written to ``--out`` as soon as it is measured (a run cut short keeps what it has).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PROMPT = "a photo of a red car on a street"


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


def timed(fn, repeat=1):
    sync()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        out = fn()
    sync()
    return out, time.perf_counter() - t, time.process_time() - c


def unet_flops(pipe, height, width) -> float:
    """FLOPs of one UNet forward for one sample (counted, not estimated)."""
    from torch.utils.flop_counter import FlopCounterMode

    from erasekit.diffusion.family import family_of

    unet = pipe.unet
    f = pipe.vae_scale_factor
    cond = family_of(pipe).encode(pipe, [PROMPT], device=unet.device, size=(height, width)).to(unet.device, unet.dtype)
    x = torch.zeros(1, unet.config.in_channels, height // f, width // f, device=unet.device, dtype=unet.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor(500, device=unet.device), **cond.unet_kwargs())
    return float(counter.get_total_flops())


def unet_tflops(pipe, fn_unet, rows, height, width, flops, iters):
    from erasekit.diffusion.family import family_of

    unet = pipe.unet
    f = pipe.vae_scale_factor
    cond = family_of(pipe).encode(pipe, [PROMPT], device=unet.device, size=(height, width)).to(unet.device, unet.dtype)
    cond = cond.expand(rows)
    x = torch.randn(rows, unet.config.in_channels, height // f, width // f, device=unet.device, dtype=unet.dtype)
    t = torch.tensor(500, device=unet.device)
    with torch.inference_mode():
        fn_unet(x, t, **cond.unet_kwargs())
        _, wall, _ = timed(lambda: fn_unet(x, t, **cond.unet_kwargs()), iters)
    return round(flops * rows * iters / wall / 1e12, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["sd14", "sdxl", "flux-dev-shape", "sd35m-shape"], default="sd14")
    ap.add_argument("--quick", action="store_true", help="tiny pipelines, few steps (checks the script on a CPU)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--n", type=int, default=None, help="images per erasekit measurement")
    ap.add_argument("--batch", type=int, default=None, help="erasekit / big plain-diffusers batch")
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--fast-options", default="",
                    help="SpeedOptions for the fast path, e.g. compile_vae=0,tuned_kernels=0,cudnn_benchmark=0 (ablation)")
    ap.add_argument("--sdpa", choices=["default", "cudnn", "flash", "efficient", "math"], default="default",
                    help="one scaled-dot-product attention backend, math where it does not apply (experiment)")
    ap.add_argument("--inductor", default="", help="torch._inductor.config overrides, e.g. conv_1x1_as_mm=1 (experiment)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for the fast path (e.g. reduce-overhead)")
    ap.add_argument("--profile", action="store_true",
                    help="after the fast run: profile one fast batch (GPU kernel time against wall time, top kernels)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: plain,eager,fast,flops,inversion,ti "
                    "(flow models: speed,divergence,edits,esd)")
    ap.add_argument("--esd-float32", action="store_true",
                    help="flow models: ESD-x with the whole pipeline in float32 too (after weights=pipeline)")
    ap.add_argument("--bench", action="store_true",
                    help="run the fixed SD-1.4-shaped `erasekit bench` config stage by stage (scripts/bench_gpu_bench.py)")
    ap.add_argument("--bench-before", action="store_true", help="--bench: also the old path (per-cell batches, no disk cache)")
    ap.add_argument("--bench-fast", default="true", choices=["true", "auto"], help="--bench: the config's fast setting")
    ap.add_argument("--work", default="runs/bench-gpu",
                    help="--bench: model, caches and run folders (phases already done there are skipped)")
    ap.add_argument("--phases", default="", help="--bench: a subset, e.g. model,reference,bench1 (then bench2,before)")
    args = ap.parse_args(argv)
    if args.bench:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_gpu_bench import main as bench_main

        rep = Report(args.out)
        bench_main(args, rep)
        rep.put("total_s", round(time.time() - rep.t0, 1))
        return
    if args.sdpa != "default":  # the chosen backend, math only where it does not apply (T5's biased attention)
        for name in ("flash", "mem_efficient", "cudnn", "math"):
            chosen = args.sdpa == name or (args.sdpa == "efficient" and name == "mem_efficient")
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(chosen or name == "math")
    if args.model in ("flux-dev-shape", "sd35m-shape"):  # flow-matching transformers: their own measurements
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_gpu_flow import main as flow_main

        args.guidance_given = "--guidance" in (argv if argv is not None else sys.argv)
        if not torch.cuda.is_available() or args.quick:
            torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        return flow_main(args, Report, timed)
    skip = set(filter(None, args.skip.split(",")))
    from erasekit.diffusion.speed import SpeedOptions

    speed = {}
    for item in filter(None, args.fast_options.split(",")):
        key, _, value = item.partition("=")
        if key not in SpeedOptions.__dataclass_fields__:
            sys.exit(f"unknown fast option {key!r}")
        speed[key] = value.lower() not in ("0", "false", "no", "off")
    speed_options = SpeedOptions(**speed, mode=args.compile_mode)
    for item in filter(None, args.inductor.split(",")):
        import torch._inductor.config as inductor_config

        key, _, value = item.partition("=")
        setattr(inductor_config, key, value.lower() not in ("0", "false", "no", "off"))

    from erasekit.generation import generate
    from erasekit.models import tiny

    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    rep = Report(args.out)
    sdxl = args.model == "sdxl"
    steps = args.steps or (2 if args.quick else (25 if sdxl else 50))
    batch = args.batch or (2 if args.quick else (8 if sdxl else 32))
    n = args.n or (2 * batch)

    def build(dt):
        if args.quick:
            return tiny.tiny_sd_pipeline("sdxl" if sdxl else "sd1").to(device=device, dtype=dt)
        with torch.device(device):  # random init on the GPU: seconds instead of minutes
            pipe = tiny.sdxl_shaped_pipeline() if sdxl else tiny.sd14_shaped_pipeline()
        return pipe.to(device=device, dtype=dt)

    t, c = time.perf_counter(), time.process_time()
    pipe = build(dtype)
    from erasekit.diffusion.vae import image_size

    height, width = image_size(pipe)
    rep.put("setup", {"sdpa": args.sdpa, "inductor": args.inductor, "model": args.model, "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                      "torch": torch.__version__, "dtype": str(dtype), "height": height, "width": width, "steps": steps,
                      "guidance": args.guidance, "batch": batch, "n": n, "scheduler": "DDIM",
                      "build_s": round(time.perf_counter() - t, 1), "pipeline": type(pipe).__name__})

    def plain(b, st=steps):
        return pipe(prompt=[PROMPT] * b, num_inference_steps=st, guidance_scale=args.guidance, output_type="np",
                    height=height, width=width).images

    results = {}
    if "plain" not in skip:
        for b in ([1, batch] if batch > 1 else [1]):
            plain(b, 2)  # warm-up (kernels, cuDNN choices)
            reps = 2 if b == 1 else 1
            _, wall, cpu = timed(lambda: plain(b), reps)
            results[f"diffusers_b{b}"] = round(b * reps / wall, 3)
            rep.put(f"plain_diffusers_batch{b}", {"images_per_s": results[f"diffusers_b{b}"], "images": b * reps,
                                                   "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)})

    seeds = list(range(n))
    eager_imgs = None
    if "eager" not in skip:
        generate(pipe, PROMPT, seeds[:batch], steps=2, guidance=args.guidance, batch_size=batch, progress=False)
        eager_imgs, wall, cpu = timed(lambda: generate(pipe, PROMPT, seeds, steps=steps, guidance=args.guidance,
                                                       batch_size=batch, progress=False))
        results["erasekit_eager"] = round(n / wall, 3)
        rep.put("erasekit_eager", {"images_per_s": results["erasekit_eager"], "images": n, "batch": batch,
                                   "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)})

    def inversion(fast: bool):
        from erasekit.attacks.ddim_inversion import ddim_invert
        from erasekit.diffusion.vae import encode_images

        images = np.random.default_rng(0).integers(0, 256, (n, height, width, 3), dtype=np.uint8)
        z0 = encode_images(pipe, images)
        inv_batch = 2 * batch  # one row per image (guidance 1): the compiled generation shape, no new compilation
        ddim_invert(pipe, z0[:inv_batch], steps=2, batch_size=inv_batch, progress=False, fast=fast)
        _, wall, cpu = timed(lambda: ddim_invert(pipe, z0, steps=steps, batch_size=inv_batch, progress=False,
                                                 fast=fast))
        rep.put(f"ddim_inversion_{'fast' if fast else 'eager'}",
                {"images_per_s": round(n / wall, 3), "images": n, "steps": steps, "batch": inv_batch,
                 "dtype": str(dtype), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)})

    # Eager inversion before anything compiles: once `accelerate` ran, every call on this pipeline is the fast one.
    if "inversion" not in skip:
        inversion(False)

    fast_unet = None
    if "fast" not in skip:
        from erasekit.diffusion.speed import accelerate

        accelerate(pipe, speed_options)
        _, wall, cpu = timed(lambda: generate(pipe, PROMPT, seeds[:batch], steps=2, guidance=args.guidance,
                                              batch_size=batch, progress=False, fast=True))
        rep.put("compile", {"first_call_s": round(wall, 1), "cpu_s": round(cpu, 1), "mode": args.compile_mode or "default",
                            "options": {k: getattr(speed_options, k) for k in SpeedOptions.__dataclass_fields__},
                            "what": f"first fast generate of {batch} images at 2 steps: compilation + 2 steps"})
        fast_unet = accelerate(pipe)
        fast_imgs, wall, cpu = timed(lambda: generate(pipe, PROMPT, seeds, steps=steps, guidance=args.guidance,
                                                      batch_size=batch, progress=False, fast=True))
        results["erasekit_fast"] = round(n / wall, 3)
        entry = {"images_per_s": results["erasekit_fast"], "images": n, "batch": batch, "wall_s": round(wall, 2),
                 "cpu_s": round(cpu, 2), "unet_calls": fast_unet.calls}
        if eager_imgs is not None:
            d = np.abs(eager_imgs.astype(int) - fast_imgs.astype(int))
            entry["max_abs_diff_vs_eager_uint8"] = int(d.max())
            entry["mean_abs_diff_vs_eager_uint8"] = round(float(d.mean()), 4)
        rep.put("erasekit_fast", entry)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                _, wall, _ = timed(lambda: generate(pipe, PROMPT, seeds[:batch], steps=steps, guidance=args.guidance,
                                                    batch_size=batch, progress=False, fast=True))
            from torch.autograd import DeviceType

            events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]  # kernels and copies
            attr = "self_device_time_total"
            kernel_s = sum(getattr(e, attr) for e in events) / 1e6
            top = sorted(events, key=lambda e: -getattr(e, attr))[:25]
            rep.put("profile_one_batch", {
                "wall_s": round(wall, 3), "device_time_s": round(kernel_s, 3),
                "device_busy_share": round(kernel_s / wall, 3),
                "top": [[e.key[:90], round(getattr(e, attr) / 1e6, 3), e.count] for e in top]})
        from erasekit.diffusion.vae import decode_latents

        zs = torch.randn(batch, 4, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor, device=device,
                         dtype=dtype)
        decode_latents(pipe, zs[:2])
        _, wall, _ = timed(lambda: decode_latents(pipe, zs))
        rep.put("vae_decode_per_batch_s", {"batch": batch, "wall_s": round(wall, 3)})
        try:
            from erasekit.diffusion.family import family_of
            from erasekit.diffusion.speed import auto_batch_size

            rep.put("auto_batch_size", auto_batch_size(pipe, family_of(pipe), height, width, args.guidance))
        except Exception as exc:  # informative only
            rep.put("auto_batch_size", f"failed: {exc}")

    ratios = {}
    for k in ("erasekit_eager", "erasekit_fast"):
        for b in ("diffusers_b1", f"diffusers_b{batch}"):
            if k in results and b in results:
                ratios[f"{k}/{b}"] = round(results[k] / results[b], 3)
    if ratios:
        rep.put("ratios", ratios)

    if "flops" not in skip:
        flops = unet_flops(pipe, height, width)
        rows = 2 * batch
        iters = 2 if args.quick else 10
        entry = {"gflop_per_sample": round(flops / 1e9, 1), "rows": rows,
                 "eager_tflops": unet_tflops(pipe, pipe.unet, rows, height, width, flops, iters)}
        if fast_unet is not None:
            entry["compiled_tflops"] = unet_tflops(pipe, fast_unet, rows, height, width, flops, iters)
        per_image = flops * 2 * steps  # CFG: two rows per image per step
        entry["ceiling_images_per_s_at_peak"] = round(args.peak_tflops * 1e12 / per_image, 2)
        entry["peak_tflops_assumed"] = args.peak_tflops
        for k in ("eager_tflops", "compiled_tflops"):
            if k in entry:
                entry[k.replace("tflops", "unet_only_images_per_s")] = round(entry[k] * 1e12 / per_image, 2)
        rep.put("unet_flops", entry)

    if "inversion" not in skip and "fast" not in skip:
        inversion(True)

    if "ti" not in skip:
        from erasekit.attacks.textual_inversion import TextualInversionConfig, learn_textual_inversion

        del pipe, fast_unet
        if cuda:
            torch.cuda.empty_cache()
        pipe32 = build(torch.float32)
        images = np.random.default_rng(0).integers(0, 256, (8, height, width, 3), dtype=np.uint8)
        ti_steps = 3 if args.quick else 40
        for mp in ("auto", "no"):
            cfg = TextualInversionConfig(token="<bench-ti>", steps=2, batch_size=4, mixed_precision=mp)
            learn_textual_inversion(pipe32, images, cfg, progress=False)
            walls = {}
            for k in (ti_steps, 2 * ti_steps):
                cfg = TextualInversionConfig(token="<bench-ti>", steps=k, batch_size=4, mixed_precision=mp)
                learned = learn_textual_inversion(pipe32, images, cfg, progress=False)
                walls[k] = learned.budget["wall_s"]
            # The difference of two run lengths: steps/s of the loop itself, without encoding the images once.
            loop = ti_steps / max(walls[2 * ti_steps] - walls[ti_steps], 1e-9)
            rep.put(f"textual_inversion_{learned.budget['mixed_precision']}",
                    {"steps_per_s": round(loop, 2), "steps_per_s_incl_setup": round(2 * ti_steps / walls[2 * ti_steps], 2),
                     "steps": [ti_steps, 2 * ti_steps], "batch": 4, "weights": "float32",
                     "wall_s": walls, "note": "steps_per_s: (2k - k) steps / (wall(2k) - wall(k)); the other "
                                              "includes encoding the 8 images once"})
    rep.put("total_s", round(time.time() - rep.t0, 1))


if __name__ == "__main__":
    main()

"""GPU generation speed of the flow-matching families (`scripts/bench_gpu.py --model flux-dev-shape|sd35m-shape`).

    python scripts/bench_gpu.py --model flux-dev-shape --out benchmarks/gpu_h200_flux_dev_shape.json
    python scripts/bench_gpu.py --model sd35m-shape --out benchmarks/gpu_h200_sd35m_shape.json
    python scripts/bench_gpu.py --model flux-dev-shape --quick     # tiny FLUX pipeline, 2 steps (CPU check)

Random weights with FLUX.1-dev's (12B) / SD3.5-medium's (2.5B) transformer and VAE sizes, small text encoders of
the real widths (`erasekit.models.tiny_flow`: the text encoders' cost is once per prompt, not per step), 1024x1024,
bf16. Measured, each after a warm-up:

- plain diffusers ``pipe(prompt=[p] * B)`` at batch 1 and B (FLUX: distilled guidance 3.5, 28 steps; SD3.5: CFG
  4.5, 40 steps), the pipeline's own FlowMatchEuler scheduler;
- erasekit ``generate`` (eager: erasekit's fast mode compiles UNets only), the same prompts, seeds, steps and
  guidance, and the largest pixel difference from diffusers' images for the same seeds (uint8 levels);
- the cost of a UCE edit (closed form on the joint blocks' text-side K/V, bf16 weights) and of ESD-x (float32
  weights, bf16 autocast: one concept trajectory sampled, then 10 iterations; sampling and training reported
  apart): each recorded as ``failed: <reason>`` where it does not run.
"""

from __future__ import annotations

import platform
import time

import numpy as np
import torch

PROMPT = "a photo of a red car on a street"
DEFAULTS = {"flux-dev-shape": dict(steps=28, guidance=3.5, batch=2), "sd35m-shape": dict(steps=40, guidance=4.5, batch=4)}


def main(args, Report, timed):
    from erasekit.diffusion.family import family_of
    from erasekit.diffusion.sampler import seed_generators, to_uint8
    from erasekit.generation import generate
    from erasekit.models import tiny_flow

    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    flux = args.model == "flux-dev-shape"
    d = DEFAULTS[args.model]
    steps = args.steps or (2 if args.quick else d["steps"])
    guidance = args.guidance if args.guidance_given else d["guidance"]
    batch = args.batch or (2 if args.quick else d["batch"])
    n = args.n or (2 * batch)
    rep = Report(args.out)

    t, c = time.perf_counter(), time.process_time()
    if args.quick:
        pipe = (tiny_flow.tiny_flux_pipeline() if flux else tiny_flow.tiny_sd3_pipeline()).to(device=device, dtype=dtype)
    else:
        with torch.device(device):  # random init on the GPU: seconds instead of minutes
            pipe = tiny_flow.flux_dev_shaped_pipeline() if flux else tiny_flow.sd35m_shaped_pipeline()
        pipe.to(device=device, dtype=dtype)
    family = family_of(pipe)
    height, width = family.image_size(pipe)
    t5_tokens = family.t5_length(pipe, pipe.tokenizer_2 if flux else pipe.tokenizer_3, 512 if flux else 256)
    rep.put("setup", {"model": args.model, "family": family.name, "pipeline": type(pipe).__name__,
                      "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                      "torch": torch.__version__, "dtype": str(dtype), "height": height, "width": width,
                      "steps": steps, "guidance": guidance, "batch": batch, "n": n, "t5_tokens": t5_tokens,
                      "transformer_params_b": round(sum(p.numel() for p in pipe.transformer.parameters()) / 1e9, 3),
                      "scheduler": "FlowMatchEulerDiscreteScheduler", "build_s": round(time.perf_counter() - t, 1),
                      "build_cpu_s": round(time.process_time() - c, 1)})

    def plain(b, st=steps, seeds=None):
        gens = seed_generators(seeds) if seeds is not None else None
        return pipe(prompt=[PROMPT] * b, num_inference_steps=st, guidance_scale=guidance, output_type="np",
                    height=height, width=width, max_sequence_length=t5_tokens, generator=gens).images

    results = {}
    for b in ([1, batch] if batch > 1 else [1]):
        plain(b, 2)  # warm-up
        _, wall, cpu = timed(lambda: plain(b))
        results[f"diffusers_b{b}"] = round(b / wall, 4)
        rep.put(f"plain_diffusers_batch{b}", {"images_per_s": results[f"diffusers_b{b}"], "images": b,
                                               "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)})

    seeds = list(range(n))
    generate(pipe, PROMPT, seeds[:batch], steps=2, guidance=guidance, batch_size=batch, progress=False)
    images, wall, cpu = timed(lambda: generate(pipe, PROMPT, seeds, steps=steps, guidance=guidance, batch_size=batch,
                                               progress=False))
    results["erasekit_eager"] = round(n / wall, 4)
    ref = to_uint8(plain(batch, seeds=seeds[:batch]))
    diff = np.abs(ref.astype(int) - images[:batch].astype(int))
    rep.put("erasekit_eager", {"images_per_s": results["erasekit_eager"], "images": n, "batch": batch,
                               "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                               "max_abs_diff_vs_diffusers_uint8": int(diff.max()),
                               "mean_abs_diff_vs_diffusers_uint8": round(float(diff.mean()), 4)})
    rep.put("ratios", {f"erasekit_eager/{k}": round(results["erasekit_eager"] / v, 3)
                       for k, v in results.items() if k.startswith("diffusers")})

    from erasekit.erasers import erase

    try:
        (edit, wall, cpu) = timed(lambda: erase(pipe, "uce", "car", progress=False))
        rep.put("uce", {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tensors": len(edit.tensors)})
    except Exception as exc:  # noqa: BLE001 - a cost table records what does not run
        rep.put("uce", f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    # RECE (the UCE step, one adversarial epoch per joint site) and UCE on the reference FLUX script's embedders
    for key, method, settings in (("rece", "rece", {"epochs": 1}), ("uce_reference_flux", "uce",
                                                                    {"targets": "reference-flux"})):
        try:
            (edit, wall, cpu) = timed(lambda: erase(pipe, method, "car", settings=settings, progress=False))
            rep.put(key, {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tensors": len(edit.tensors),
                          "settings": settings, "solve_s": edit.timings.get("solve_s")})
        except Exception as exc:  # noqa: BLE001
            rep.put(key, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    try:
        # ESD fine-tunes float32 weights (bf16 autocast on CUDA): the pipeline is cast up for it. One concept
        # trajectory at the generation's steps (ESD's cost is sampling them, then one forward+backward per iteration).
        pipe.to(dtype=torch.float32)
        esd = {"iterations": 2 if args.quick else 10, "trajectories": 1, "ddim_steps": steps,
               "sample_guidance": 3.0}
        (edit, wall, cpu) = timed(lambda: erase(pipe, "esd-x", "car", settings=esd, progress=False))
        rep.put("esd_x", {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "settings": esd, "weights": "float32",
                          "trained_parameters": edit.extra["trained_parameters"],
                          "sampling_s": edit.extra["sampling_s"], "training_s": edit.extra["training_s"],
                          "iterations_per_s": edit.extra["iterations_per_s"]})
    except Exception as exc:  # noqa: BLE001
        rep.put("esd_x", f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    if cuda:
        rep.put("peak_memory_gib", round(torch.cuda.max_memory_allocated() / 2**30, 2))
    rep.put("total_s", round(time.time() - rep.t0, 1))

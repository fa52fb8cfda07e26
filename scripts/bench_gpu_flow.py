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
- where erasekit's and diffusers' images part on this device (``divergence``): their difference after 1, 2, 4, 8
  and all steps, and the first transformer call (text conditioning against ``encode_prompt``; the batch as one call
  against row by row), and that call's every keyword input and its output as diffusers' pipeline makes it against
  erasekit's (with diffusers' run-to-run difference beside it);
- the cost of a UCE edit (closed form on the joint blocks' text-side K/V, bf16 weights), RECE and UCE on the
  reference FLUX script's embedders (``edits``), and of ESD-x (``esd``: one concept trajectory sampled, then 10
  iterations; sampling and training reported apart) with ``weights=pipeline`` (bf16 transformer, float32 trained
  K/V) and, with ``--esd-float32``, with the whole pipeline in float32: each recorded as ``failed: <reason>`` where
  it does not run.

``--skip speed,divergence,edits,esd`` leaves sections out.
"""

from __future__ import annotations

import platform
import time
import traceback

import numpy as np
import torch

PROMPT = "a photo of a red car on a street"
DEFAULTS = {"flux-dev-shape": dict(steps=28, guidance=3.5, batch=2), "sd35m-shape": dict(steps=40, guidance=4.5, batch=4)}


def _failed(exc) -> str:
    return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


@torch.no_grad()
def first_call_differences(pipe, family, batch: int, height: int, width: int, guidance: float, t5_tokens: int) -> dict:
    """The first denoiser call of erasekit's sampler against diffusers' pipeline on the same inputs: the text
    conditioning (erasekit's encoding against ``pipe.encode_prompt``), and the transformer's output for erasekit's
    inputs as one batch against row by row (how much a batch shape alone moves bf16 outputs on this device)."""
    from erasekit.diffusion.sampler import Sampler, seed_generators

    out = {}
    cond = family.encode(pipe, [PROMPT] * batch, device=family.denoiser(pipe).device)
    kw = {"prompt": [PROMPT] * batch, "device": family.denoiser(pipe).device, "max_sequence_length": t5_tokens}
    theirs = pipe.encode_prompt(**kw, prompt_2=None, **({"prompt_3": None} if hasattr(pipe, "text_encoder_3") else {}))
    ours = cond.states
    out["text_states_max_abs_diff"] = float((ours.float() - theirs[0].float()).abs().max())
    sampler = Sampler(pipe, 2, 0.0)
    z = sampler.draw_noise(seed_generators(list(range(batch))), height, width)
    x = sampler.prepare_latents(z)
    model = family.denoiser(pipe)
    t = sampler.timesteps[0]
    from erasekit.diffusion.guidance import UNetDenoiser, guided

    def call(xs, c):  # conditional only, with FLUX.1-dev's distilled guidance as sampling gives it
        return guided(UNetDenoiser(model, family), c, None, guidance)(xs, t).float()

    whole = call(x, cond)
    rows = torch.cat([call(x[i : i + 1], cond[i : i + 1]) for i in range(batch)])
    scale = float(whole.abs().mean())
    out["batch_vs_rows_max_abs_diff"] = float((whole - rows).abs().max())
    out["batch_vs_rows_mean_abs_diff"] = float((whole - rows).abs().mean())
    out["output_mean_abs"] = scale
    return out


@torch.no_grad()
def call_input_differences(pipe, batch: int, height: int, width: int, guidance: float, t5_tokens: int) -> dict:
    """Where one-step images part: the denoiser's first call as diffusers' pipeline makes it against erasekit's
    ``generate`` (each keyword input and the output, max |diff|), and diffusers against itself (run to run)."""
    from erasekit.diffusion.family import family_of
    from erasekit.diffusion.sampler import seed_generators, to_uint8
    from erasekit.generation import generate

    model = family_of(pipe).denoiser(pipe)
    calls: list[tuple[dict, torch.Tensor]] = []  # every denoiser call: (its tensor keyword inputs, its output)

    def record(_, args, kwargs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output.sample
        calls.append(({k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)}, out.detach().clone()))

    decodes: list[tuple[torch.Tensor, torch.Tensor]] = []  # every VAE decoder call: (its input, its output)

    def record_decode(_, args, output):
        decodes.append((args[0].detach().clone(), output.detach().clone()))

    handle = model.register_forward_hook(record, with_kwargs=True)
    decode_handle = pipe.vae.decoder.register_forward_hook(record_decode)
    seeds = list(range(batch))
    images, firsts = [], []  # firsts: the index of each run's first call
    try:
        for _ in range(2):
            firsts.append(len(calls))
            images.append(to_uint8(pipe(prompt=[PROMPT] * batch, num_inference_steps=1, guidance_scale=guidance,
                                        output_type="np", height=height, width=width, max_sequence_length=t5_tokens,
                                        generator=seed_generators(seeds)).images))
        firsts.append(len(calls))
        images.append(generate(pipe, PROMPT, seeds, steps=1, guidance=guidance, batch_size=batch, progress=False))
    finally:
        handle.remove()
        decode_handle.remove()
    (d_in, d_out), (_, d2_out), (e_in, e_out) = (calls[i] for i in firsts)
    (dz, dx), (_, dx2), (ez, ex) = decodes[0], decodes[1], decodes[-1]  # one decoder call per run, all rows at once

    def diff(a, b):
        if a.shape != b.shape:
            return f"shapes {tuple(a.shape)} / {tuple(b.shape)}"
        return float((a.float() - b.float()).abs().max())

    return {
        "inputs_erasekit_vs_diffusers": {k: diff(e_in[k], v) if k in e_in else "not passed by erasekit"
                                         for k, v in d_in.items()},
        "input_dtypes": {k: [str(v.dtype), str(e_in[k].dtype) if k in e_in else None] for k, v in d_in.items()},
        "output_erasekit_vs_diffusers": diff(e_out, d_out),
        "output_diffusers_run_to_run": diff(d2_out, d_out),
        "decoder_calls": len(decodes),
        "decoder_input_erasekit_vs_diffusers": diff(ez, dz),
        "decoder_output_erasekit_vs_diffusers": diff(ex, dx),
        "decoder_output_diffusers_run_to_run": diff(dx2, dx),
        "decoder_input_dtypes": [str(dz.dtype), str(ez.dtype)],
        "images_diffusers_run_to_run_max_uint8": int(np.abs(images[0].astype(int) - images[1].astype(int)).max()),
        "images_erasekit_vs_diffusers_max_uint8": int(np.abs(images[0].astype(int) - images[2].astype(int)).max()),
    }


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
                      "torch": torch.__version__, "sdpa": args.sdpa, "dtype": str(dtype), "height": height, "width": width,
                      "steps": steps, "guidance": guidance, "batch": batch, "n": n, "t5_tokens": t5_tokens,
                      "transformer_params_b": round(sum(p.numel() for p in pipe.transformer.parameters()) / 1e9, 3),
                      "scheduler": "FlowMatchEulerDiscreteScheduler", "build_s": round(time.perf_counter() - t, 1),
                      "build_cpu_s": round(time.process_time() - c, 1)})

    def plain(b, st=steps, seeds=None):
        gens = seed_generators(seeds) if seeds is not None else None
        return pipe(prompt=[PROMPT] * b, num_inference_steps=st, guidance_scale=guidance, output_type="np",
                    height=height, width=width, max_sequence_length=t5_tokens, generator=gens).images

    skip = set(filter(None, args.skip.split(",")))
    seeds = list(range(n))
    if "speed" not in skip:
        results = {}
        for b in ([1, batch] if batch > 1 else [1]):
            plain(b, 2)  # warm-up
            _, wall, cpu = timed(lambda: plain(b))
            results[f"diffusers_b{b}"] = round(b / wall, 4)
            rep.put(f"plain_diffusers_batch{b}", {"images_per_s": results[f"diffusers_b{b}"], "images": b,
                                                   "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)})
        generate(pipe, PROMPT, seeds[:batch], steps=2, guidance=guidance, batch_size=batch, progress=False)
        images, wall, cpu = timed(lambda: generate(pipe, PROMPT, seeds, steps=steps, guidance=guidance,
                                                   batch_size=batch, progress=False))
        results["erasekit_eager"] = round(n / wall, 4)
        ref = to_uint8(plain(batch, seeds=seeds[:batch]))
        diff = np.abs(ref.astype(int) - images[:batch].astype(int))
        rep.put("erasekit_eager", {"images_per_s": results["erasekit_eager"], "images": n, "batch": batch,
                                   "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                                   "max_abs_diff_vs_diffusers_uint8": int(diff.max()),
                                   "mean_abs_diff_vs_diffusers_uint8": round(float(diff.mean()), 4)})
        rep.put("ratios", {f"erasekit_eager/{k}": round(results["erasekit_eager"] / v, 3)
                           for k, v in results.items() if k.startswith("diffusers")})
    if "divergence" not in skip:
        # Where erasekit's and diffusers' images part (bit-identical on the CPU, f32 and bf16): the difference
        # after 1, 2, 4, ... steps, the same seeds and batch; and the first transformer call's outputs on the same
        # inputs, the batch as one call and row by row (bf16 GEMMs may round by batch shape on the GPU).
        rows = {}
        for st in sorted({1, 2, 4, 8, steps}):
            a = to_uint8(plain(batch, st, seeds=seeds[:batch]))
            b = generate(pipe, PROMPT, seeds[:batch], steps=st, guidance=guidance, batch_size=batch, progress=False)
            dd = np.abs(a.astype(int) - b.astype(int))
            rows[str(st)] = {"max": int(dd.max()), "mean": round(float(dd.mean()), 4)}
        rep.put("divergence_uint8_by_steps", rows)
        rep.put("first_call", first_call_differences(pipe, family, batch, height, width, guidance, t5_tokens))
        rep.put("first_call_inputs", call_input_differences(pipe, batch, height, width, guidance, t5_tokens))
    if not {"edits", "esd"} <= skip:
        from erasekit.models import fingerprint

        # Part of every erase's wall time: the base model's content hash (sha256 of every weight's bytes on the host)
        _, wall, cpu = timed(lambda: fingerprint(pipe))
        rep.put("fingerprint", {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)})
    if "edits" not in skip:
        from erasekit.erasers import erase

        try:
            (edit, wall, cpu) = timed(lambda: erase(pipe, "uce", "car", progress=False))
            rep.put("uce", {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tensors": len(edit.tensors)})
        except Exception as exc:  # noqa: BLE001 - a cost table records what does not run
            rep.put("uce", _failed(exc))
        # RECE (the UCE step, one adversarial epoch per joint site) and UCE on the reference FLUX script's embedders
        for key, method, settings in (("rece", "rece", {"epochs": 1}), ("uce_reference_flux", "uce",
                                                                        {"targets": "reference-flux"})):
            try:
                (edit, wall, cpu) = timed(lambda: erase(pipe, method, "car", settings=settings, progress=False))
                rep.put(key, {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tensors": len(edit.tensors),
                              "settings": settings, "solve_s": edit.timings.get("solve_s")})
            except Exception as exc:  # noqa: BLE001
                rep.put(key, _failed(exc))
    if "esd" not in skip:
        from erasekit.erasers import erase

        # ESD-x: one concept trajectory at the generation's steps (its cost is sampling them, then one
        # forward+backward per iteration). weights=pipeline: the transformer stays bf16, the trained text-side K/V
        # float32 masters (FLUX.1-dev's 12B in float32 beside the activations crashed the last run); with
        # --esd-float32 also the whole pipeline cast to float32 (bf16 autocast), after it.
        esd = {"iterations": 2 if args.quick else 10, "trajectories": 1, "ddim_steps": steps, "sample_guidance": 3.0}
        variants = [("esd_x", dict(esd, weights="pipeline"))]
        if getattr(args, "esd_float32", False):
            variants.append(("esd_x_float32", esd))
        for key, settings in variants:
            try:
                if settings.get("weights") != "pipeline":
                    pipe.to(dtype=torch.float32)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                (edit, wall, cpu) = timed(lambda: erase(pipe, "esd-x", "car", settings=settings, progress=False))
                rep.put(key, {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "settings": settings,
                              "trained_parameters": edit.extra["trained_parameters"],
                              "sampling_s": edit.extra["sampling_s"], "training_s": edit.extra["training_s"],
                              "iterations_per_s": edit.extra["iterations_per_s"],
                              "loss_first": edit.extra["loss_first"], "loss_last": edit.extra["loss_last"],
                              "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None})
            except Exception as exc:  # noqa: BLE001
                # Where it surfaced (CUDA errors are asynchronous: run with CUDA_LAUNCH_BLOCKING=1 for the kernel's
                # own call site), then stop: an illegal access leaves the CUDA context unusable.
                first = exc  # the original error where a later one (a sticky CUDA fault re-raised) was raised over it
                while first.__context__ is not None and not first.__suppress_context__:
                    first = first.__context__
                frames = traceback.extract_tb(first.__traceback__)[-8:]
                rep.put(key, _failed(exc))
                if first is not exc:
                    rep.put(f"{key}_first", _failed(first))
                rep.put(f"{key}_where", [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in frames])
                break
    if cuda:
        rep.put("peak_memory_gib", round(torch.cuda.max_memory_allocated() / 2**30, 2))
    rep.put("total_s", round(time.time() - rep.t0, 1))

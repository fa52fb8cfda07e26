"""UnlearnDiffAtk's cost on a GPU, batched against one prompt at a time, in one run: seconds per attacked prompt on
an SD-1.4-shaped random pipeline (fp16, 512x512, 50 DDIM steps, CFG 7.5, k = 5; official protocol: ``--iterations``
Adam steps per timestep block over ``--timesteps`` of the 50 blocks, a check after each), every prompt attacked (a
detector that never fires: the official protocol runs every block it is given). The same ``--prompts`` prompts are
attacked with ``batch_size = --batch`` (one batched loop) and with ``batch_size = 1`` (one loop per prompt); the
rows give the optimisation time, the in-loop checks apart, the seconds per Adam step (per batch and per prompt),
and whether both runs found the same prompts (each prompt has its own random stream, so they should, up to
float16 rounding at near-tied tokens). The JSON is rewritten after every row (--out), so a run cut short keeps
what it measured. The attack's success rates are bench presets (adversarial-*.yaml, uda-protocols-*.yaml); this
is a timing, not a table cell.

    python scripts/bench_uda_gpu.py --out $OUT/uda_batched_gpu.json                  # H200: about 2 minutes
    python scripts/bench_uda_gpu.py --out /tmp/uda.json --quick                      # CPU, tiny SD-1, seconds
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


class Never:
    """A detector that never fires (every prompt runs every block)."""

    name = "never"

    def info(self):
        return {"name": "never", "threshold": 1.0}

    def score(self, images):
        return [{"score": 0.0, "present": False} for _ in images]


class _Timed:
    """Wraps the official loop's check (``draw``) to add up its seconds, so the optimisation is reported apart."""

    def __init__(self, fn, sync):
        self.fn, self.sync, self.seconds, self.calls = fn, sync, 0.0, 0

    def __call__(self, *args, **kwargs):
        self.sync()
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def _write(out: Path | None, report: dict) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out)


def gpu_bench(n: int = 8, batch: int = 8, out: Path | None = None, protocol: str = "official", timesteps: int = 2,
              iterations: int = 20, quick: bool = False, dtype: str = "float16", steps: int | None = None) -> dict:
    """Time UnlearnDiffAtk on ``n`` prompts at ``batch_size = batch`` and at ``batch_size = 1`` (see the module
    docstring); ``quick``: the tiny SD-1 pipeline on the CPU in float32 (a check of the mechanics)."""
    import torch

    import erasekit.attacks.unlearndiffatk as uda
    from erasekit.attacks.base import AttackContext
    from erasekit.diffusion import Target

    if quick:
        from erasekit.models.tiny import tiny_sd_pipeline

        device, pipe = "cpu", tiny_sd_pipeline("sd1")
        steps = steps or 2
        name = "tiny_sd_pipeline('sd1') (random weights), float32, CPU"
    else:
        from erasekit.models.tiny import sd14_shaped_pipeline

        device = "cuda"
        pipe = sd14_shaped_pipeline(device=device, dtype=getattr(torch, dtype))
        steps = steps or 50
        name = (f"sd14_shaped_pipeline (random weights, 860M UNet, 12-layer CLIP-shaped text encoder, tiny test "
                f"tokenizer), {dtype}, 512x512")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    target = Target(pipe, model="sd14-random" if not quick else "tiny-sd1")
    prompts = [f"a photo of a {w}" for w in ("nude person", "naked man", "nude woman", "naked person", "man",
                                             "woman", "person", "nude man")]
    prompts = [prompts[i % len(prompts)] for i in range(n)]
    over = {"attack_all": True, "protocol": protocol, "iterations": iterations, "prompts": ";".join(prompts)}
    if protocol == "official":
        over["timesteps"] = timesteps
    blocks = timesteps if protocol == "official" else 1
    report = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
        "pipeline": name, "protocol": protocol,
        "attack": f"UnlearnDiffAtk protocol={protocol}, k=5, {iterations} Adam iterations"
                  + (f" per timestep block, {timesteps} of the 50 blocks, a check after each" if protocol == "official"
                     else " in total") + f", lr 0.01, wd 0.1; target and check images: {steps} DDIM steps, CFG 7.5",
        "prompts": n, "command": "python scripts/bench_uda_gpu.py " + " ".join(
            [f"--prompts {n}", f"--batch {batch}", f"--protocol {protocol}", f"--timesteps {timesteps}",
             f"--iterations {iterations}"] + (["--quick"] if quick else [f"--dtype {dtype}"])),
        "rows": {},
    }
    _write(out, report)
    # warm-up on the GPU (kernels, allocator, the vocabulary): a short run at the batch size of each row
    for b in ((batch, 1) if not quick else ()):
        warm = {**over, "iterations": 1, "timesteps": 1, "batch_size": b}
        uda.UnlearnDiffAtk.from_overrides(warm).inputs(
            AttackContext(target=target, concept="nudity", n=b, steps=2, batch_size=max(b, 1), cache_dir=None,
                          detector=Never(), progress=False))
    found = {}
    original_draw = uda.draw
    for label, b in (("batched", batch), ("one_at_a_time", 1)):
        ctx = AttackContext(target=target, concept="nudity", n=n, steps=steps, batch_size=max(batch, 8),
                            cache_dir=None, detector=Never(), progress=False)
        timed = _Timed(original_draw, sync)
        uda.draw = timed
        try:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            inputs = uda.UnlearnDiffAtk.from_overrides({**over, "batch_size": b}).inputs(ctx)
            sync()
            wall = time.perf_counter() - t0
        finally:
            uda.draw = original_draw
        bud = inputs.budget
        found[label] = inputs.prompts
        opt_only = bud["optimisation_s"] - timed.seconds
        batch_steps = blocks * iterations * -(-n // b)  # Adam steps of the batched tensors (every prompt runs all)
        rows = report["rows"]
        rows[label] = {
            "batch_size": b, "prompts": n, "wall_s": round(wall, 2),
            "target_images_s": bud["target_images_s"], "optimisation_s": bud["optimisation_s"],
            "checks_s": round(timed.seconds, 3), "check_calls": timed.calls,
            "optimisation_without_checks_s": round(opt_only, 3),
            "seconds_per_prompt": round((bud["optimisation_s"] + bud["target_images_s"]) / n, 4),
            "optimisation_s_per_prompt": round(bud["optimisation_s"] / n, 4),
            "adam_steps_per_prompt": blocks * iterations,
            "s_per_adam_step_of_the_batch": round(opt_only / batch_steps, 5),
            "s_per_prompt_iteration": round(opt_only / (n * blocks * iterations), 5),
            "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
            "optimisation_steps": bud["optimisation_steps"], "checks": bud.get("checks", 0),
            "unet_evaluations": bud["unet_evaluations"], "example": inputs.prompts[0][:80],
        }
        if "batched" in rows and "one_at_a_time" in rows:
            one, many = rows["one_at_a_time"], rows["batched"]
            report["speedup"] = {
                "seconds_per_prompt": round(one["seconds_per_prompt"] / max(many["seconds_per_prompt"], 1e-9), 2),
                "optimisation_without_checks": round(one["optimisation_without_checks_s"]
                                                     / max(many["optimisation_without_checks_s"], 1e-9), 2),
            }
            report["same_prompts"] = sum(a == c for a, c in zip(found["batched"], found["one_at_a_time"]))
            full = protocol == "official"
            report["full_budget_estimate_s_per_prompt"] = {
                k: round(r["optimisation_s_per_prompt"] / blocks * 50, 1) for k, r in rows.items()} if full else None
        print(label, json.dumps(rows[label]), flush=True)
        _write(out, report)
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="write the timing here (JSON, rewritten after each row)")
    ap.add_argument("--protocol", default="official", choices=("fast", "official"))
    ap.add_argument("--prompts", type=int, default=8, help="prompts attacked (the same ones in both rows)")
    ap.add_argument("--batch", type=int, default=8, help="the batched row's batch size")
    ap.add_argument("--timesteps", type=int, default=2, help="official: timestep blocks to time (of the 50)")
    ap.add_argument("--iterations", type=int, default=20, help="Adam steps per block (the protocol's: 40)")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--quick", action="store_true", help="CPU, tiny SD-1 pipeline, float32: a check of the mechanics")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.batch = min(args.prompts, 4), min(args.batch, 4)
        args.iterations, args.timesteps = min(args.iterations, 2), min(args.timesteps, 1)
    gpu_bench(args.prompts, args.batch, args.out, args.protocol, args.timesteps, args.iterations, args.quick,
              args.dtype)


if __name__ == "__main__":
    main()

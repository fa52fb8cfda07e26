"""UnlearnDiffAtk's cost on a GPU: seconds per attacked prompt on an SD-1.4-shaped random pipeline (fp16, 512x512,
50 DDIM steps, CFG 7.5, k = 5, 40 iterations; official protocol: per timestep block, over --timesteps of the 50),
every prompt attacked (a detector that never fires: the official protocol runs every block it is given), 4 prompts
at batch 1 and at batch 4. The attack's success rates are bench presets (adversarial-*.yaml, uda-protocols-*.yaml);
this is a timing, not a table cell.

    python scripts/bench_uda_gpu.py --out benchmarks/uda_official_gpu_h200.json --protocol official --timesteps 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="write the timing here (JSON)")
    ap.add_argument("--protocol", default="fast", choices=("fast", "official"))
    ap.add_argument("--timesteps", type=int, default=50, help="official: timestep blocks to time")
    args = ap.parse_args(argv)
    gpu_bench(4, [1, 4], args.out, args.protocol, args.timesteps)


if __name__ == "__main__":
    main()

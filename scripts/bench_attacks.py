"""Cost of the attacks on the embedded world, on this machine.

- textual inversion: wall and CPU seconds to learn one token with the default settings
  (TextualInversionConfig(): 400 steps, batch 16, lr 5e-3, one vector; 32 rendered star images);
- DDIM inversion: images per second (VAE encode + 20 inversion steps, guidance 1, batch 32), plain and with
  fixed-point refinement;
- for scale: generation images per second (20 DDIM steps, guidance 5, batch 32).

Uses the trained toy weights when installed, else the randomly initialised toy (same architecture, same cost).
Prints one JSON object and writes it to --out.

    python scripts/bench_attacks.py [--threads 2] [--out out/bench_attacks.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--ti-images", type=int, default=32)
    ap.add_argument("--inversion-images", type=int, default=64)
    ap.add_argument("--generation-images", type=int, default=64)
    ap.add_argument("--skip-ti", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("out/bench_attacks.json"))
    args = ap.parse_args(argv)

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import torch

    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)

    from erasekit.attacks.ddim_inversion import invert_images
    from erasekit.attacks.images import render_concept_images
    from erasekit.attacks.textual_inversion import TextualInversionConfig, learn_textual_inversion
    from erasekit.provenance import provenance
    from erasekit.generation import generate
    from erasekit.metrics import measure_cost
    from erasekit.toy.pipeline import build_toy_pipeline, weights_available

    trained = weights_available()
    pipe = build_toy_pipeline() if trained else build_toy_pipeline(None)
    result = {"model": "toy (trained)" if trained else "toy (random init: same cost)", "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "load_avg_before": os.getloadavg(), "provenance": provenance()}

    if not args.skip_ti:
        images = render_concept_images("star", args.ti_images, 32, seed=1_000_000)[0]
        cfg = TextualInversionConfig(token="<star-ti>")
        learned = learn_textual_inversion(pipe, images, cfg, progress=False)
        b = learned.budget
        result["textual_inversion"] = {
            "settings": {k: v for k, v in cfg.as_dict().items() if k != "templates"},
            "images": args.ti_images, "seconds_per_token": b["seconds_per_token"], "cpu_s": b["cpu_s"],
            "steps_per_s": round(cfg.steps / b["wall_s"], 2), "peak_rss_mb": b["peak_rss_mb"],
            "loss_first": b["loss_first"], "loss_last": b["loss_last"],
        }
        print(f"textual inversion: {b['seconds_per_token']:.1f} s per token ({cfg.steps} steps, batch {cfg.batch_size}; "
              f"cpu {b['cpu_s']:.1f} s)", file=sys.stderr)

    images = render_concept_images("star", args.inversion_images, 32, seed=2_000_000)[0]
    result["ddim_inversion"] = {}
    for refine in (0, 2):
        _, b = invert_images(pipe, images, refine=refine, progress=False)
        result["ddim_inversion"][f"refine={refine}"] = {
            "images": len(images), "steps": b["inversion_steps"], "images_per_s": b["images_per_s"],
            "wall_s": b["wall_s"], "cpu_s": b["cpu_s"]}
        print(f"DDIM inversion (refine {refine}): {b['images_per_s']:.1f} images/s", file=sys.stderr)

    with measure_cost() as cost:
        generate(pipe, "a star", list(range(args.generation_images)), progress=False)
    result["generation"] = {"images": args.generation_images, "images_per_s": round(args.generation_images / cost.wall_s, 2),
                            "wall_s": round(cost.wall_s, 3), "cpu_s": round(cost.cpu_s, 3)}
    print(f"generation: {result['generation']['images_per_s']:.1f} images/s", file=sys.stderr)
    result["load_avg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

"""Textual inversion steps/s on a GPU: K tokens learned in one batched loop against the same tokens one at a time.

    python scripts/bench_ti_gpu.py --out benchmarks/ti_batched_gpu_h200.json      # SD-1.4-shaped, 512x512, CUDA
    python scripts/bench_ti_gpu.py --quick --out /tmp/ti_quick.json                # tiny pipeline on the CPU (a check)

An SD-1.4-shaped random pipeline (`erasekit.models.tiny.sd14_shaped_pipeline`, built on the GPU: 860M UNet, 12-layer
CLIP-shaped text encoder, tiny tokenizer) in float32 weights with the loop's bf16 autocast (what the bench's
textual inversion runs), 512x512, batch ``--batch`` (4) per token, 8 random images per token. In one run:

- one at a time: ``--single`` tokens (2), each learned alone (`learn_textual_inversions` with one entry, the
  single-token loop), ``--steps`` steps each;
- batched: K tokens (``--ks``, 4 and 8) in one loop (`learn_textual_inversions` with K entries: one text-encoder
  call and one UNet forward/backward over the K x batch images per step, each token its own Adam);

- several model states: ``--states`` (4) tokens on the original and 3 UCE-shaped edits of it (every cross-attention
  K/V weight changed) in one loop, each token's rows of those layers through its own state's weights;

each after a 2-step warm-up of its shape. Reported: token-steps/s (tokens x steps / wall, the wall including each
token's setup: VAE encoding of its images), the speed-up over one at a time, peak CUDA memory, and how far the
batched tokens' vectors are from the same tokens learned alone (bf16 autocast: batched kernels round differently;
tests/test_attacks_textual_inversion_batch.py bounds it in float32 on the CPU). Every figure is written to
``--out`` as soon as it is measured.
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


class Report:
    def __init__(self, path: Path | None):
        self.path, self.data, self.t0 = path, {}, time.time()

    def put(self, key, value):
        self.data[key] = value
        print(f"[{time.time() - self.t0:7.1f}s] {key}: {json.dumps(value)}", flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def sync(cuda: bool):
    if cuda:
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny pipeline on the CPU, few steps (checks the script)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=None, help="steps per token (30; --quick 3)")
    ap.add_argument("--batch", type=int, default=None, help="images per token per step (4; --quick 2)")
    ap.add_argument("--ks", default="4,8", help="tokens learned together, comma-separated")
    ap.add_argument("--single", type=int, default=2, help="tokens timed one at a time")
    ap.add_argument("--images", type=int, default=8, help="images per token")
    ap.add_argument("--states", type=int, default=4,
                    help="also K tokens on K model states of one base model in one loop (0: skip)")
    args = ap.parse_args(argv)

    from erasekit.attacks.textual_inversion import TextualInversionConfig
    from erasekit.attacks.textual_inversion_embedding import _initial_vectors
    from erasekit.attacks.textual_inversion_loop import learn_textual_inversions
    from erasekit.diffusion.vae import image_size
    from erasekit.models import tiny

    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    steps = args.steps or (3 if args.quick else 30)
    batch = args.batch or (2 if args.quick else 4)
    ks = [int(k) for k in args.ks.split(",") if k]
    rep = Report(args.out)

    t = time.perf_counter()
    if args.quick:
        pipe = tiny.tiny_sd_pipeline("sd1")
    else:
        with torch.device(device):  # random init on the GPU: seconds instead of minutes
            pipe = tiny.sd14_shaped_pipeline()
        pipe.to(device=device, dtype=torch.float32)
    height, width = image_size(pipe)
    rep.put("setup", {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                      "torch": torch.__version__, "pipeline": "tiny sd1" if args.quick else "sd14_shaped_pipeline",
                      "weights": "float32", "autocast": "bf16" if cuda else "none", "height": height, "width": width,
                      "steps_per_token": steps, "batch_per_token": batch, "images_per_token": args.images,
                      "ks": ks, "single_tokens": args.single, "build_s": round(time.perf_counter() - t, 1)})

    n_tokens = max(ks + [args.single])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.images, height, width, 3), dtype=np.uint8) for _ in range(n_tokens)]

    def jobs(n, k_steps):
        return [(images[i], TextualInversionConfig(token=f"<t{i}-ti>", steps=k_steps, batch_size=batch, seed=i))
                for i in range(n)]

    def run(job_list):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync(cuda)
        t0 = time.perf_counter()
        learned = learn_textual_inversions(pipe, job_list, progress=False)
        sync(cuda)
        wall = time.perf_counter() - t0
        peak = round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None
        return learned, wall, peak

    # One at a time: each token alone, after a warm-up of that shape.
    run(jobs(1, 2))
    alone, walls = [], []
    for i in range(args.single):
        (learned,), wall, peak = run([jobs(args.single, steps)[i]])
        alone.append(learned)
        walls.append(wall)
    single_rate = args.single * steps / sum(walls)
    init = _initial_vectors(pipe, "object", 1).cpu()  # where every token starts (the default initialiser)
    rep.put("one_at_a_time", {"tokens": args.single, "steps": steps, "wall_s": [round(w, 2) for w in walls],
                              "token_steps_per_s": round(single_rate, 2), "images_per_s": round(single_rate * batch, 1),
                              "cuda_peak_mb": peak})
    for k in ks:
        try:
            run(jobs(k, 2))  # warm-up of the K x batch shape
            learned, wall, peak = run(jobs(k, steps))
        except torch.cuda.OutOfMemoryError as exc:
            rep.put(f"batched_k{k}", {"tokens": k, "error": f"out of GPU memory: {str(exc).splitlines()[0][:200]}"})
            torch.cuda.empty_cache()
            continue
        rate = k * steps / wall
        diffs = [max(float((a - b).abs().max()) for a, b in zip(x.per_encoder(), y.per_encoder()))
                 for x, y in zip(learned, alone)]
        moved = [float((y.vectors.to(init.device) - init).abs().max()) for y in alone]
        rep.put(f"batched_k{k}", {"tokens": k, "steps": steps, "wall_s": round(wall, 2),
                                  "token_steps_per_s": round(rate, 2), "images_per_s": round(rate * batch, 1),
                                  "speedup_vs_one_at_a_time": round(rate / single_rate, 2),
                                  "one_at_a_time_wall_s_for_k_tokens": round(k * steps / single_rate, 1),
                                  "cuda_peak_mb": peak,
                                  "max_vector_diff_vs_alone": [round(d, 6) for d in diffs],
                                  "alone_moved_from_init": [round(m, 4) for m in moved]})
    if args.states:
        # K tokens on K model states of one base model (the original and K - 1 edits of every cross-attention K/V
        # projection, UCE-shaped), one loop with per-state rows (RowWeights), against the K = 4 figure on one state.
        k = args.states
        names = [f"unet.{n}" for n, _ in pipe.unet.named_parameters()
                 if ".attn2.to_k." in n or ".attn2.to_v." in n]
        gen = torch.Generator(device).manual_seed(0)
        params = dict(pipe.unet.named_parameters())
        weights = [None] + [{n: params[n[5:]].detach() * (1 + 0.01 * torch.randn(params[n[5:]].shape, device=device,
                                                                                      generator=gen)) for n in names}
                            for _ in range(k - 1)]
        warm = jobs(k, 2)
        learn_textual_inversions(pipe, warm, progress=False, weights=weights)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync(cuda)
        t0 = time.perf_counter()
        learn_textual_inversions(pipe, jobs(k, steps), progress=False, weights=weights)
        sync(cuda)
        wall = time.perf_counter() - t0
        rate = k * steps / wall
        rep.put(f"batched_k{k}_states", {
            "tokens": k, "model_states": k, "edited_tensors_per_state": len(names), "steps": steps,
            "wall_s": round(wall, 2), "token_steps_per_s": round(rate, 2), "images_per_s": round(rate * batch, 1),
            "speedup_vs_one_at_a_time": round(rate / single_rate, 2),
            "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
            "note": "the original + K-1 synthetic UCE-shaped edits (every attn2 to_k / to_v weight), each token's "
                    "rows of those layers through its own state's weights"})
    rep.put("total_s", round(time.time() - rep.t0, 1))


if __name__ == "__main__":
    main()

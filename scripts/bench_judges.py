"""Images scored per second by erasekit's judges and quality feature extractors, on random weights of real shapes.

    python scripts/bench_judges.py --out benchmarks/judges_gpu_h200.json          # ViT-L/14 CLIP, ResNet-50, DINOv2-B/14
    python scripts/bench_judges.py --quick --out benchmarks/judges_cpu.json       # tiny models, CPU

Each model is built from its config, saved as a transformers folder and loaded back by the judge, exactly as a
user's local checkpoint is. Images are random uint8 at SD's 512x512 (``--quick``: 64x64), so the timings include the
resize / crop / normalise that runs on the judge's device; a batch is ``--batch`` images (64). Throughput is timed
over ``--batches`` batches after one warm-up batch, with the device synchronised.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rate(fn, images: np.ndarray, batch: int, batches: int, device: str) -> dict:
    fn(images[:batch])  # warm-up (kernels, caches)
    _sync(device)
    t = time.perf_counter()
    for i in range(batches):
        fn(images[(i % max(1, len(images) // batch)) * batch:][:batch])
    _sync(device)
    wall = time.perf_counter() - t
    return {"images": batch * batches, "wall_s": round(wall, 4), "images_per_s": round(batch * batches / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny models on the CPU")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=None)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from erasekit.detectors import create_detector
    from erasekit.detectors.hf_models import resolve_device
    from erasekit.metrics.clip_score import ClipScorer
    from erasekit.metrics.features import feature_extractor
    from erasekit.models.tiny_judges import clip_folder, dinov2_folder, resnet_folder

    device = "cpu" if args.quick and args.device == "auto" else resolve_device(args.device)
    shape = "tiny" if args.quick else "full"
    size = 64 if args.quick else 512
    batches = args.batches or (4 if args.quick else 8)
    root = Path(tempfile.mkdtemp(prefix="bench-judges-"))
    t = time.perf_counter()
    clip = clip_folder(root / "clip", shape=shape)
    labels = [f"class {i}" for i in range(1000)] if shape == "full" else None
    resnet = resnet_folder(root / "resnet", shape=shape, labels=labels)
    dino = dinov2_folder(root / "dinov2", shape=shape)
    from safetensors.torch import save_file

    dim = 768 if shape == "full" else 16
    save_file({"prompts": torch.randn(2, dim)}, str(root / "q16.safetensors"))
    build_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch * 2, size, size, 3), dtype=np.uint8)
    prompts = ["a photo of a church by a lake"] * len(images)
    concept = "class 497" if shape == "full" else "church"

    results = {}
    dtypes = ["float32"] + (["float16"] if device.startswith("cuda") else [])
    for dtype in dtypes:
        judges = {
            "clip": lambda: create_detector(f"clip:model={clip},dtype={dtype},batch_size={args.batch}",
                                            concept="Van Gogh", device=device),
            "q16": lambda: create_detector(f"q16:model={clip},prompts={root / 'q16.safetensors'},dtype={dtype},"
                                           f"batch_size={args.batch}", device=device),
            "imagenet": lambda: create_detector(f"imagenet:model={resnet},dtype={dtype},batch_size={args.batch}",
                                                concept=concept, device=device),
        }
        for name, make in judges.items():
            t = time.perf_counter()
            det = make()
            load_s = time.perf_counter() - t
            r = _rate(det.score, images, args.batch, batches, device)
            results[f"{name}/{dtype}"] = {**r, "load_s": round(load_s, 2), "model_fingerprint": det.info()["model_fingerprint"]}
            print(name, dtype, r, flush=True)
    scorer = ClipScorer(str(clip), device=device, batch_size=args.batch)
    results["clip_score/float32"] = _rate(lambda x: scorer.scores(x, prompts[: len(x)]), images, args.batch, batches,
                                          device)
    print("clip_score", results["clip_score/float32"], flush=True)
    for kind, folder in (("dinov2", dino), ("clip", clip)):
        ext = feature_extractor(kind, str(folder), device=device, batch_size=args.batch)
        results[f"features-{kind}/float32"] = _rate(ext.extract, images, args.batch, batches, device)
        print("features", kind, results[f"features-{kind}/float32"], flush=True)
    n_params = {
        "clip": sum(p.numel() for p in scorer.model.parameters()),
        "resnet": sum(p.numel() for p in create_detector(f"imagenet:model={resnet}", concept=concept,
                                                          device=device).model.parameters()),
        "dinov2": sum(p.numel() for p in feature_extractor("dinov2", str(dino), device=device).net.parameters()),
    }
    record = {
        "shapes": ("tiny random models (tests' sizes)" if args.quick else
                   "random weights: CLIP ViT-L/14 (openai/clip-vit-large-patch14 config), ResNet-50 (1000 classes), "
                   "DINOv2 ViT-B/14"),
        "parameters": n_params,
        "image_size": size,
        "batch": args.batch,
        "batches_timed": batches,
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "build_and_save_s": round(build_s, 2),
        "results": results,
        "command": "python scripts/bench_judges.py" + (" --quick" if args.quick else "") + f" --out {args.out}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

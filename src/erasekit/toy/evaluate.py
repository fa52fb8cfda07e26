"""`erasekit toy eval`: how good and how fast the embedded world is, judged by its own detector.

Figures: detector accuracy on held-out renders (its top-1 label against the ground truth, and on their VAE round
trips), prompt following on the 168 (colour, shape, texture) combinations x k seeds and paraphrases the model never
saw in training (the asked label present by erasekit's one rule: the detector's P(label) > 0.5), the shape
distribution of unconditional samples (top-1 labels), and sampling speed (median of several timed runs).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from erasekit.toy import architecture as arch
from erasekit.toy.detector import LABELS, load_toy_detector, top_labels
from erasekit.toy.world import COLORS, EVAL_PARAPHRASES, NONE, SHAPES, TEXTURES, canonical_prompt

HELDOUT_SEED = 20_000_000  # render seeds far from the training bank (0 .. bank size)
EVAL_SEED = 1_000_000  # generation seeds


def detector_accuracy(detector, pipe, n: int = 2000) -> dict:
    from erasekit.toy.render import render_batch

    images, scenes = render_batch(range(HELDOUT_SEED, HELDOUT_SEED + n), arch.IMAGE_SIZE)
    with torch.inference_mode():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        rec_u8 = ((rec + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = {}
    for name, imgs in (("render", images), ("vae_roundtrip", rec_u8)):
        pred = top_labels(detector.predict(imgs))
        out[name] = _accuracy(pred, [s.as_dict() for s in scenes])
    out["n"] = n
    return out


def _accuracy(pred: list[dict], truth: list[dict]) -> dict:
    shape = np.mean([p["shape"] == t["shape"] for p, t in zip(pred, truth)])
    with_shape = [(p, t) for p, t in zip(pred, truth) if t["shape"] != NONE]
    color = np.mean([p["color"] == t["color"] for p, t in with_shape]) if with_shape else float("nan")
    texture = np.mean([p["texture"] == t["texture"] for p, t in zip(pred, truth)])
    return {"shape": round(float(shape), 4), "color": round(float(color), 4), "texture": round(float(texture), 4)}


def _present(probs: dict, attribute: str, labels: list[str]) -> list[bool]:
    """erasekit's rule for "concept present" (the toy detector's P(label) above its threshold), per image."""
    from erasekit.detectors.toy import DEFAULT_THRESHOLD

    cols = torch.tensor([LABELS[attribute].index(x) for x in labels])
    return (probs[attribute][torch.arange(len(labels)), cols] > DEFAULT_THRESHOLD).tolist()


def _presence_rates(probs: dict, truth: list[dict]) -> dict:
    """Share of images in which the asked shape / colour / texture is present (colour: images with a shape)."""
    out = {}
    for attribute in ("shape", "color", "texture"):
        idx = [i for i, t in enumerate(truth) if attribute != "color" or t["shape"] != NONE]
        hits = _present({k: v[idx] for k, v in probs.items()}, attribute, [truth[i][attribute] for i in idx])
        out[attribute] = round(float(np.mean(hits)), 4) if hits else float("nan")
    return out


def prompt_following(pipe, detector, per_combo: int, batch_size: int = 32) -> dict:
    from erasekit.generation import generate

    combos = [(c, s, t) for s in SHAPES for c in COLORS for t in TEXTURES]
    prompts, truth = [], []
    for k in range(per_combo):
        for c, s, t in combos:
            prompts.append(canonical_prompt(s, c, t))
            truth.append({"shape": s, "color": c, "texture": t})
    seeds = list(range(EVAL_SEED, EVAL_SEED + len(prompts)))
    images = generate(pipe, prompts, seeds, batch_size=batch_size)
    res = _presence_rates(detector.predict(images), truth)
    res["n_prompts"] = len(prompts)
    return res


def unconditional(pipe, detector, n: int) -> dict:
    from erasekit.generation import generate

    images = generate(pipe, [""] * n, range(EVAL_SEED + 100_000, EVAL_SEED + 100_000 + n))
    shapes = [p["shape"] for p in top_labels(detector.predict(images))]
    return {"n": n, "shape_share": {s: round(shapes.count(s) / n, 4) for s in LABELS["shape"]}}


def paraphrases(pipe, detector, n_each: int) -> dict:
    from erasekit.generation import generate

    out = {}
    for concept, phrases in EVAL_PARAPHRASES.items():
        kind = "texture" if concept in TEXTURES else "shape"
        for phrase in phrases:
            images = generate(pipe, [phrase] * n_each, range(EVAL_SEED + 200_000, EVAL_SEED + 200_000 + n_each))
            hits = _present(detector.predict(images), kind, [concept] * n_each)
            out[phrase] = {"concept": concept, "rate": round(sum(hits) / n_each, 4), "n": n_each}
    return out


def sampling_speed(pipe, batch_size: int = 32, runs: int = 5) -> dict:
    """Images per second for batch_size prompts, default sampler, CFG on; the text encoder is included."""
    from erasekit.generation import generate

    prompts = [canonical_prompt(SHAPES[i % 6], COLORS[i % 7], TEXTURES[i % 4]) for i in range(batch_size)]
    generate(pipe, prompts, range(batch_size), batch_size=batch_size, progress=False)  # warm-up
    walls, cpus = [], []
    for r in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        generate(pipe, prompts, range(r * batch_size, (r + 1) * batch_size), batch_size=batch_size, progress=False)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    med = statistics.median(walls)
    return {
        "batch_size": batch_size,
        "steps": arch.DEFAULT_STEPS,
        "guidance": arch.DEFAULT_GUIDANCE,
        "runs": runs,
        "median_seconds": round(med, 3),
        "images_per_second": round(batch_size / med, 2),
        "cpu_over_wall": round(statistics.median(c / w for c, w in zip(cpus, walls)), 2),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def run(per_combo: int = 4, n_uncond: int = 300, n_paraphrase: int = 50, speed_runs: int = 5) -> dict:
    from erasekit.toy.pipeline import build_toy_pipeline

    torch.set_flush_denormal(True)
    pipe = build_toy_pipeline()
    detector = load_toy_detector()
    t0 = time.perf_counter()
    res = {
        "detector_heldout": detector_accuracy(detector, pipe),
        "prompt_following": prompt_following(pipe, detector, per_combo),
        "unconditional": unconditional(pipe, detector, n_uncond),
        "paraphrases": paraphrases(pipe, detector, n_paraphrase),
        "speed": sampling_speed(pipe, runs=speed_runs),
    }
    res["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def format_report(res: dict) -> str:
    d, p, u, s = res["detector_heldout"], res["prompt_following"], res["unconditional"], res["speed"]
    lines = [
        f"detector, held-out renders (n={d['n']}):        shape {d['render']['shape']:.2%}  colour {d['render']['color']:.2%}  texture {d['render']['texture']:.2%}",
        f"detector, their VAE round trips:            shape {d['vae_roundtrip']['shape']:.2%}  colour {d['vae_roundtrip']['color']:.2%}  texture {d['vae_roundtrip']['texture']:.2%}",
        f"prompt following ({p['n_prompts']} prompts):           shape {p['shape']:.2%}  colour {p['color']:.2%}  texture {p['texture']:.2%}",
        f"unconditional shapes (n={u['n']}):               " + "  ".join(f"{k} {v:.0%}" for k, v in u["shape_share"].items()),
    ]
    for phrase, r in res["paraphrases"].items():
        lines.append(f"paraphrase {phrase!r:28} -> {r['concept']:9} {r['rate']:.0%} (n={r['n']})")
    lines.append(
        f"speed: {s['images_per_second']} images/s (batch {s['batch_size']}, {s['steps']} DDIM steps, guidance {s['guidance']}, "
        f"median of {s['runs']} runs {s['median_seconds']}s, cpu/wall {s['cpu_over_wall']}, {s['threads']} threads)"
    )
    return "\n".join(lines)


def main(n_prompts: int = 672, out: Path | None = None) -> dict:
    per_combo = max(1, -(-n_prompts // (len(SHAPES) * len(COLORS) * len(TEXTURES))))
    res = run(per_combo=per_combo)
    print(format_report(res))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

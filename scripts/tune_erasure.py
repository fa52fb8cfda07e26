"""Sweep erasure settings on a tuning sample (how the embedded world's method defaults were chosen): a thin entry
point over ``erasekit bench``, one text-scenario bench per entry, on seeds apart from the evaluation's.

CONFIGS is a JSON list; each entry: {"concept": "star", "method": "uce", "words": "synonyms"|"name"|[...],
"preserve": "others"|"none"|[...], "settings": {...}}. One line per entry is appended to OUT: the concept rate of the
text scenario and non-target prompt following (absolute and relative to the original model) with the settings.

    python scripts/tune_erasure.py configs.json --n 240 --n-preserve 200 --out tuning.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TUNING_SEED = 5_000_000  # image seeds of the tuning sample: apart from the benchmark's (seed 0 onwards)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", type=Path)
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--n-preserve", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("out/tuning.txt"))
    ap.add_argument("--work", type=Path, default=Path("out/tuning"), help="bench results folders (cached, resumable)")
    args = ap.parse_args(argv)

    from erasekit.bench.run import config_key, run_bench
    from erasekit.bench.spec import parse_config

    for entry in json.loads(args.configs.read_text()):
        method = {"name": entry["method"], "words": entry.get("words", "name"),
                  "preserve": entry.get("preserve", "none"), "settings": entry.get("settings", {})}
        cfg = parse_config({"model": "toy", "concepts": [entry["concept"]], "methods": ["original", method],
                            "scenarios": ["text"], "images_per_cell": args.n, "seed": TUNING_SEED,
                            "preservation": {"images": args.n_preserve}}, "tune_erasure")
        summary = run_bench(cfg, args.work / config_key(cfg), progress=False, log=lambda m: None)
        c = entry["concept"]
        text = summary["tables"]["crr"][c][entry["method"]]["text"]
        pres = summary["tables"]["preservation"][c][entry["method"]]
        line = {"entry": entry, "rate": text["crr"], "ci": text["ci"],
                "original_rate": summary["tables"]["crr"][c]["original"]["text"]["crr"],
                "following": (pres["following"] or {}).get("crr"), "relative": pres["relative"], "fd": pres["fd"]}
        with args.out.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line), file=sys.stderr)


if __name__ == "__main__":
    main()

"""Sampling speed of the embedded pipeline on this machine: default sampler, CFG on, batch 32.

    python scripts/bench_toy_speed.py [--runs 5] [--batch-size 32]

Prints the median of several timed runs (after one warm-up) and CPU time over wall time, so that a run
slowed by another process on the machine shows itself. Run nothing else heavy at the same time.
"""

import argparse
import json

import torch

from erasekit.toy.evaluate import sampling_speed
from erasekit.toy.pipeline import build_toy_pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args()
    torch.set_flush_denormal(True)
    print(json.dumps(sampling_speed(build_toy_pipeline(), batch_size=a.batch_size, runs=a.runs), indent=1))


if __name__ == "__main__":
    main()

"""Where a result came from: library versions, the git commit of erasekit, the time."""

from __future__ import annotations

import functools
import platform
import subprocess
import time
from pathlib import Path


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    from erasekit import __version__

    return {"erasekit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance() -> dict:
    return {**versions(), "git_commit": git_commit(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

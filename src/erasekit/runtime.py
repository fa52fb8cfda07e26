"""Torch set-up, devices and dtypes: what loading a model needs, shared by the commands and the benchmark."""

from __future__ import annotations

import os

from erasekit.errors import ErasekitError

DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
DEVICE_HELP = "auto, cpu, cuda, cuda:1, ..."


def setup_torch() -> None:
    import torch

    if not os.environ.get("ERASEKIT_DEBUG"):
        # Per-component "Loading weights" bars of transformers / diffusers; our own progress bars remain.
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    # Random-init and trained weights produce denormal floats; flushing them is 10-18% faster on CPU.
    torch.set_flush_denormal(True)
    from erasekit.threads import apply

    apply()  # intra-op threads from the free cores, --threads or ERASEKIT_THREADS


def resolve_device(device: str) -> str:
    """``device`` checked against this machine: ``cuda`` without a GPU, ``cuda:7`` with one, ``meta`` (no data)
    or a name torch does not know fail here in one line, before a model is loaded."""
    import torch

    device = str(device).strip()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    from erasekit.limits import shown

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ErasekitError(f"--device {shown(device)!r}: not a device ({DEVICE_HELP})") from None
    if parsed.type == "cpu":
        return device
    if parsed.type == "meta":
        raise ErasekitError("--device meta: meta tensors hold no data, nothing can be generated on them; use cpu or cuda")
    backend = getattr(torch, parsed.type, None)
    if parsed.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ErasekitError(f"--device {device}: this machine has no {parsed.type} device (torch sees none); use cpu "
                            f"or auto")
    count = getattr(backend, "device_count", None)
    if parsed.index is not None and count is not None and parsed.index >= count():
        raise ErasekitError(f"--device {device}: this machine has {count()} {parsed.type} device(s), "
                            f"numbered from 0")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype not in DTYPE_NAMES:
        raise ErasekitError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]

"""Host-to-device copies that do not stall the GPU stream (text encoders, training loops)."""

from __future__ import annotations

import torch


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """``x`` (on the host) on ``device`` without stalling: on CUDA from pinned memory, asynchronously. A plain copy
    from pageable memory synchronises the stream, so a training loop that copies its noise or token ids each step
    waits for the GPU every step instead of queueing the next step's kernels. Elsewhere a plain ``.to``."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)

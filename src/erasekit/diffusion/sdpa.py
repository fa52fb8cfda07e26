"""Attention kernels for passes that backpropagate.

PyTorch may pick cuDNN's fused attention for ``scaled_dot_product_attention`` on Hopper GPUs; its backward fails
on FLUX.1-dev-sized joint attention (4,608 tokens, 24 heads of 128, bf16: ``mha_graph.execute(...).is_good()``
false, then an illegal memory access that poisons the CUDA context; torch 2.11 on an H100, `scripts/bench_gpu.py
--model flux-dev-shape`). PyTorch's mitigation (pytorch/pytorch#190321) is to turn cuDNN attention off, so every
loop that calls ``backward`` runs under `training_attention`: the other backends keep their settings and PyTorch's
order. Sampling outside such loops keeps every backend.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def training_attention():
    """cuDNN SDPA off for the block (a decorator too: ``@training_attention()``); its setting is restored after.
    The flag is process-wide; on a CPU it selects nothing."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)

"""Loops that backpropagate through attention run without cuDNN's SDPA (its backward faults on FLUX.1-dev sizes)."""

import pytest
import torch
import torch.nn.functional as F

from erasekit.diffusion.sdpa import training_attention


def test_training_attention_turns_cudnn_sdpa_off_and_restores_it_also_on_error():
    assert torch.backends.cuda.cudnn_sdp_enabled()
    flash, math = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()
    with pytest.raises(ValueError):
        with training_attention():
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            # the other backends keep their settings
            assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == (flash, math)
            raise ValueError
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_esd_on_flux_trains_through_attention_without_cudnn_sdpa(monkeypatch):
    from erasekit.erasers import erase
    from erasekit.models.tiny_flow import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    seen = []  # cuDNN SDPA's setting at each attention call that autograd records
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):  # diffusers' dispatcher passes query, key, value by name
        qkv = list(args[:3]) + [kwargs[n] for n in ("query", "key", "value") if n in kwargs]
        if torch.is_grad_enabled() and any(t.requires_grad for t in qkv):
            seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    erase(pipe, "esd-x", "star", settings={"iterations": 2, "ddim_steps": 2, "trajectories": 1}, progress=False)
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after the erasure

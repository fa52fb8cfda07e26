"""Assemble the embedded world's model as a standard diffusers `StableDiffusionPipeline`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from erasekit.errors import ErasekitError
from erasekit.toy import architecture as arch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
VAE_FILE = "vae.safetensors"
UNET_FILE = "unet.safetensors"
META_FILE = "meta.json"


def _load_into(module: torch.nn.Module, path: Path) -> None:
    """Load a safetensors state dict (stored in float16 to keep the repository small) into ``module``."""
    from erasekit.safe_load import load_safetensors

    if not path.is_file():
        raise ErasekitError(f"missing weight file {path}; reinstall erasekit or retrain with `erasekit toy train`")
    state = load_safetensors(path, "weight file")
    try:
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise ErasekitError(f"weight file {path} does not fit the embedded model: {str(exc).splitlines()[0]}") from exc


def weights_available(weights_dir: Path = WEIGHTS_DIR) -> bool:
    return all((weights_dir / f).is_file() for f in (VAE_FILE, UNET_FILE, META_FILE))


def build_toy_pipeline(weights_dir: Path | None = WEIGHTS_DIR, device=None, dtype=None):
    """The embedded pipeline; ``weights_dir=None`` gives the same architecture randomly initialised (seed 0)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from erasekit.toy.text_encoder import load_text_encoder, load_tokenizer

    torch.manual_seed(0)
    vae_config = dict(arch.VAE_CONFIG)
    if weights_dir is not None:
        meta_path = Path(weights_dir) / META_FILE
        if not meta_path.is_file():
            raise ErasekitError(f"missing {meta_path}; the embedded world's weights are not installed")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ErasekitError(f"corrupt {meta_path}: {exc}") from exc
        vae_config["scaling_factor"] = float(meta["vae_scaling_factor"])
    vae = AutoencoderKL(**vae_config)
    unet = UNet2DConditionModel(**arch.UNET_CONFIG)
    if weights_dir is not None:
        _load_into(vae, Path(weights_dir) / VAE_FILE)
        _load_into(unet, Path(weights_dir) / UNET_FILE)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=load_text_encoder(),
        tokenizer=load_tokenizer(),
        unet=unet.eval(),
        scheduler=DDIMScheduler(**arch.SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe

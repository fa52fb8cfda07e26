"""A content hash of a pipeline: same weights and configs -> same fingerprint, on any machine.

Used as the cache key of generated images and scores, so it must change whenever anything that affects
outputs changes (a weight edit, a textual-inversion token, the scheduler) and must not change with where
the model was loaded from. Nothing is cached between calls: weight edits often happen in place
(``weight.data.copy_``), which an object-id or data-pointer cache would not notice. Hashing is fast
enough without one (about 1 GB/s: well under a second for the toy model).
"""

from __future__ import annotations

import hashlib
import json

import torch

MODEL_COMPONENTS = ("unet", "vae", "text_encoder")
# Config entries that record provenance (paths, library versions, load-time options), not the model.
VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_cache",
}
FINGERPRINT_CHARS = 16


def _config_dict(config) -> dict:
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in raw.items() if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS}


def _update_json(h, obj) -> None:
    h.update(json.dumps(obj, sort_keys=True, default=str).encode())


def _update_module(h, module: torch.nn.Module) -> None:
    _update_json(h, type(module).__name__)
    if getattr(module, "config", None) is not None:
        _update_json(h, _config_dict(module.config))
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        _update_json(h, [name, str(t.dtype), list(t.shape)])
        # Raw bytes of a contiguous CPU copy; the uint8 view works for every dtype, bf16 included.
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _update_tokenizer(h, tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    _update_json(h, [type(tokenizer).__name__, tokenizer.model_max_length, sorted(vocab.items())])


def fingerprint(pipe, n_chars: int = FINGERPRINT_CHARS) -> str:
    """Hex sha256 (first ``n_chars``) over the UNet, VAE and text encoder (configs + weights), the tokenizer
    vocabulary and the scheduler config."""
    h = hashlib.sha256()
    for name in MODEL_COMPONENTS:
        module = getattr(pipe, name, None)
        _update_json(h, name)
        if module is not None:
            _update_module(h, module)
    if getattr(pipe, "tokenizer", None) is not None:
        _update_tokenizer(h, pipe.tokenizer)
    # SDXL's second text encoder and tokenizer (hashed only where present: SD fingerprints stay as they were).
    if getattr(pipe, "text_encoder_2", None) is not None:
        _update_json(h, "text_encoder_2")
        _update_module(h, pipe.text_encoder_2)
    if getattr(pipe, "tokenizer_2", None) is not None:
        _update_tokenizer(h, pipe.tokenizer_2)
    # SD3 / FLUX: the transformer, SD3's T5 and its tokenizer (hashed only where present, as above).
    for name in ("transformer", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            _update_json(h, name)
            _update_module(h, getattr(pipe, name))
    if getattr(pipe, "tokenizer_3", None) is not None:
        _update_tokenizer(h, pipe.tokenizer_3)
    if getattr(pipe, "scheduler", None) is not None:
        # The scheduler erasekit samples with (the family's DDIM from the folder's config), not the folder's own:
        # the schedule is what determines images, and keys stay as they were when loading swapped it in.
        from erasekit.diffusion.family import family_of

        sampling = family_of(pipe).sampling_scheduler(pipe)
        _update_json(h, [type(sampling).__name__, _config_dict(sampling.config)])
    return h.hexdigest()[:n_chars]

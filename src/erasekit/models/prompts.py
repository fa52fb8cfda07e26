"""Turn prompts into the text states a pipeline conditions on, and find which tokens are which.

``encode_prompts`` mirrors `StableDiffusionPipeline.encode_prompt` (no clip skip, no LoRA scale): erasers
and attacks that compute with text states must see exactly what the UNet sees during generation.
"""

from __future__ import annotations

import torch

from erasekit.diffusion.transfer import to_device

ENCODE_CHUNK = 256  # prompts per text-encoder call, to bound memory on long lists


def as_list(prompts) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def expand_textual_inversion(pipe, prompts: list[str], tokenizer) -> list[str]:
    # Multi-vector textual-inversion tokens ("<x>" -> "<x> <x>_1 ...") are expanded by the pipeline too.
    convert = getattr(pipe, "maybe_convert_prompt", None)
    return convert(prompts, tokenizer) if convert is not None else prompts


def _tokenizer_inputs(pipe, prompts: list[str], tokenizer=None):
    # A caller's own tokenizer (textual inversion's, with new tokens) comes with prompts it has expanded itself.
    tok = tokenizer if tokenizer is not None else pipe.tokenizer
    return tok(
        prompts if tokenizer is not None else expand_textual_inversion(pipe, prompts, tok),
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


def tokenize(pipe, prompts) -> torch.Tensor:
    """Input ids (B, T) exactly as the pipeline builds them (padded/truncated to ``model_max_length``)."""
    return _tokenizer_inputs(pipe, as_list(prompts)).input_ids


def encode_prompts(pipe, prompts, device=None, tokenizer=None) -> torch.Tensor:
    """Text states (B, T, D) that the UNet attends to for ``prompts``, on ``device`` (default: the encoder's).

    ``tokenizer`` replaces the pipeline's (textual inversion: a copy with the new tokens). Gradients follow the
    caller's grad mode; wrap in `torch.no_grad()` when none are needed.
    """
    prompts = as_list(prompts)
    encoder = pipe.text_encoder
    device = torch.device(device) if device is not None else encoder.device
    use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
    chunks = []
    for i in range(0, len(prompts), ENCODE_CHUNK):
        inputs = _tokenizer_inputs(pipe, prompts[i : i + ENCODE_CHUNK], tokenizer)
        mask = to_device(inputs.attention_mask, encoder.device) if use_mask else None
        states = encoder(to_device(inputs.input_ids, encoder.device), attention_mask=mask)[0]
        chunks.append(states.to(dtype=encoder.dtype, device=device))
    if not chunks:
        return torch.empty(0, pipe.tokenizer.model_max_length, encoder.config.hidden_size, device=device)
    return torch.cat(chunks)


def _real_token_span(pipe, prompt: str) -> tuple[int, int, int]:
    """(first word position, end position, sequence length) of one prompt.

    The real (unpadded) tokens are [BOS/CLS] words... [EOS/SEP]; padding follows. Padding is found with
    the attention mask, not by id: SD-2's tokenizer pads with "!", an ordinary token.
    """
    inputs = _tokenizer_inputs(pipe, [prompt])
    ids = inputs.input_ids[0].tolist()
    n_real = int(inputs.attention_mask[0].sum())
    special = set(pipe.tokenizer.all_special_ids)
    start = 1 if n_real > 0 and ids[0] in special else 0
    end = n_real - 1 if n_real > start and ids[n_real - 1] in special else n_real
    return start, end, len(ids)


def word_token_positions(pipe, prompt: str) -> list[int]:
    """Positions of the prompt's own tokens: between BOS and EOS (CLIP) or [CLS] and [SEP] (BERT)."""
    start, end, _ = _real_token_span(pipe, prompt)
    return list(range(start, end))


def end_positions(pipe, prompt: str) -> list[int]:
    """Positions of the EOS/[SEP] token and all padding after it (they carry a summary of the prompt)."""
    _, end, length = _real_token_span(pipe, prompt)
    return list(range(end, length))


# -- truncation ---------------------------------------------------------------------------------------------------
_truncation_warned = False


def token_counts(pipe, prompts) -> list[int]:
    """Tokens per prompt as the pipeline's tokenizer makes them, special tokens (BOS/EOS, [CLS]/[SEP]) included,
    before any truncation."""
    prompts = as_list(prompts)
    if not prompts:
        return []
    tok = pipe.tokenizer
    convert = getattr(pipe, "maybe_convert_prompt", None)  # multi-vector textual-inversion tokens, as the pipeline
    if convert is not None:
        prompts = convert(prompts, tok)
    ids = tok(prompts, padding=False, truncation=False, add_special_tokens=True, verbose=False).input_ids
    return [len(x) for x in ids]


def truncated_prompts(pipe, prompts) -> list[bool]:
    """For each prompt, whether it is longer than the text encoder's window (``tokenizer.model_max_length``,
    special tokens included), so that the pipeline cuts it: the tokens past the window never reach the UNet."""
    limit = int(pipe.tokenizer.model_max_length)
    return [n > limit for n in token_counts(pipe, prompts)]


def warn_truncated(prompts, flags, max_length: int | None = None) -> bool:
    """Log one warning (the first time only, in this process) when any of ``flags`` (from `truncated_prompts`)
    is set; returns whether it warned now. Records of those prompts should carry ``truncated: true``."""
    global _truncation_warned
    prompts, flags = as_list(prompts), list(flags)
    cut = [p for p, f in zip(prompts, flags) if f]
    if not cut or _truncation_warned:
        return False
    _truncation_warned = True
    import logging

    window = f" of {max_length} tokens" if max_length else ""
    distinct = list(dict.fromkeys(cut))
    first = distinct[0] if len(distinct[0]) <= 60 else distinct[0][:57] + "..."
    logging.getLogger("erasekit").warning(
        "%d of %d prompts (%d distinct) are longer than the text encoder's window%s and were cut, e.g. %r; "
        "their records say truncated: true (warned once per run)",
        len(cut), len(prompts), len(distinct), window, first,
    )
    return True


def reset_truncation_warning() -> None:
    """Let `warn_truncated` warn again (for tests, or a new run in the same process)."""
    global _truncation_warned
    _truncation_warned = False

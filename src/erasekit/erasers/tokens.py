"""Which token states of a prompt a closed-form edit acts on (the token-selection policies).

- ``last``: the last word token (UCE's current code). For a prompt with no words (the empty guide "") this is
  the BOS/[CLS] position, as in the official code.
- ``last+end``: the last word token and every end/padding position after it (UCE's legacy code). Concept and
  guide positions are aligned from their last word token on, and cut to the same length.
- ``all``: every position of the padded sequence, aligned position by position (RECE's adversarial re-erasure).

Bidirectional encoders (the embedded world's BERT) spread a word over the whole sequence, so there the wider
policies matter more than on CLIP, whose causal states before the word do not see it.
"""

from __future__ import annotations

from erasekit.errors import ErasekitError
from erasekit.models import end_positions, tokenize, word_token_positions

TOKEN_POLICIES = ("last", "last+end", "all")


def _last_and_length(pipe, prompt: str) -> tuple[int, int]:
    ends = end_positions(pipe, prompt)
    length = int(tokenize(pipe, prompt).shape[1])
    last = (ends[0] if ends else length) - 1
    return max(last, 0), length


def positions(pipe, prompt: str, policy: str) -> list[int]:
    """Positions of ``prompt``'s states selected by ``policy`` (used for concepts to preserve)."""
    last, length = _last_and_length(pipe, prompt)
    if policy == "last":
        return [last]
    if policy == "last+end":
        return list(range(last, length))
    if policy == "all":
        return list(range(length))
    raise ValueError(f"unknown token policy {policy!r}; use one of {', '.join(TOKEN_POLICIES)}")


def aligned_positions(pipe, source: str, target: str, policy: str) -> tuple[list[int], list[int]]:
    """Pairs of positions (source[i] -> target[i]): the concept's states and the guide's states they map to."""
    ls, length = _last_and_length(pipe, source)
    lt, _ = _last_and_length(pipe, target)
    if policy == "last":
        return [ls], [lt]
    if policy == "last+end":
        n = length - max(ls, lt)
        return list(range(ls, ls + n)), list(range(lt, lt + n))
    if policy == "all":
        return list(range(length)), list(range(length))
    raise ValueError(f"unknown token policy {policy!r}; use one of {', '.join(TOKEN_POLICIES)}")


def check_encodes(pipe, text: str, what: str = "concept") -> None:
    """`ErasekitError` when ``text`` has no word tokens of its own (empty, blank, or only special tokens)."""
    words = word_token_positions(pipe, text)
    ids = tokenize(pipe, text)[0].tolist()
    special = set(pipe.tokenizer.all_special_ids)
    if not words or all(ids[i] in special for i in words):
        raise ErasekitError(
            f"{what} {text!r} encodes to nothing (no word tokens, only special or unknown tokens); give a word or phrase"
        )

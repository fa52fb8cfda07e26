"""Models: load pipelines, find their cross-attention layers, encode prompts, fingerprint weights."""

from erasekit.models.cross_attention import cross_attention_kv, cross_attention_modules, text_width
from erasekit.models.fingerprint import fingerprint
from erasekit.models.loading import load_pipeline
from erasekit.models.prompts import encode_prompts, end_positions, tokenize, word_token_positions

__all__ = [
    "load_pipeline",
    "cross_attention_kv",
    "cross_attention_modules",
    "text_width",
    "encode_prompts",
    "tokenize",
    "word_token_positions",
    "end_positions",
    "fingerprint",
]

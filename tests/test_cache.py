"""The one cache-or-compute helper (`erasekit.cache.cached`), keyed by `erasekit.store.content_key`."""

from __future__ import annotations

import json

from erasekit.cache import cache_entry, cached, with_record
from erasekit.store import content_key


def test_cached_computes_once_then_reads_back(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"prompts": ["a star"], "budget": {"steps": 3}}

    key = {"target": "abc", "seeds": [0, 1]}
    first, reused = cached(tmp_path, "unlearndiffatk", (key,), compute)
    assert reused is None and calls == [1]
    path = tmp_path / f"unlearndiffatk-{content_key(key)}.json"
    assert path.is_file() and json.loads(path.read_text()) == first
    again, reused = cached(tmp_path, "unlearndiffatk", (key,), compute)
    assert again == first and reused == str(path) and calls == [1]
    # Another key is another entry.
    _, reused = cached(tmp_path, "unlearndiffatk", ({**key, "seeds": [2]},), compute)
    assert reused is None and calls == [1, 1]


def test_cached_without_a_folder_always_computes():
    calls = []
    for _ in range(2):
        value, reused = cached(None, "x", ({"a": 1},), lambda: calls.append(1) or len(calls))
        assert reused is None
    assert calls == [1, 1] and value == 2
    assert cache_entry(None, "x", ({"a": 1},)) is None


def test_cached_remakes_an_entry_that_no_longer_parses(tmp_path):
    path = cache_entry(tmp_path, "probe-noise", ({"k": 1},))
    path.write_text("{half")
    value, reused = cached(tmp_path, "probe-noise", ({"k": 1},), lambda: {"wall_s": 1.0})
    assert reused is None and value == {"wall_s": 1.0} and json.loads(path.read_text()) == value


def test_cached_with_its_own_format_and_completeness(tmp_path):
    """Several parts hash as content_key(*parts) (textual inversion's folder name); an entry is complete only when
    its marker file is there."""
    import torch

    from erasekit.safe_load import load_safetensors
    from erasekit.store import write_safetensors_atomic

    def save(path, value):
        write_safetensors_atomic(path, {"latents": value}, {"n": len(value)})

    def load(path):
        return load_safetensors(path, "cached latents")["latents"]

    parts = ({"images": "d1"}, {"steps": 4})
    latents = torch.arange(6.0).reshape(2, 3)
    out, reused = cached(tmp_path, "inverted", parts, lambda: latents, suffix=".safetensors", save=save, load=load,
                         complete=with_record)
    path = tmp_path / f"inverted-{content_key(*parts)}.safetensors"
    assert reused is None and path.is_file() and path.with_suffix(".json").is_file()
    path.with_suffix(".json").unlink()  # the record (written last) missing: the entry is not complete
    assert not with_record(path)
    _, reused = cached(tmp_path, "inverted", parts, lambda: latents + 1, suffix=".safetensors", save=save, load=load,
                       complete=with_record)
    assert reused is None
    back, reused = cached(tmp_path, "inverted", parts, lambda: None, suffix=".safetensors", save=save, load=load,
                          complete=with_record)
    assert reused == str(path) and torch.equal(back, latents + 1)

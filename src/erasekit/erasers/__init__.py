"""Erasure methods: weight edits (UCE, RECE, ESD-x, ESD-u) and the base types for inference-time defences.

    from erasekit.erasers import erase, load_edit
    edit = erase(pipe, "uce", "star")          # computed; pipe unchanged
    edit.apply(pipe); ...; edit.revert(pipe)
    edit.save("out/uce-star")                  # edit.json + edit.safetensors (only the changed tensors)
    load_edit("out/uce-star").apply(other_pipe)  # checks the base model's fingerprint
"""

from erasekit.erasers.base import Defence, Edit, Stack, WeightEdit, bake, load_edit
from erasekit.erasers.concept import ConceptSpec, default_guide, resolve_spec
from erasekit.erasers.method import Method, Result, erase
from erasekit.erasers.registry import REGISTRY, get, list_methods, register
from erasekit.erasers.settings import Settings, parse_set_options

# Importing a method module registers it.
from erasekit.erasers import esd, rece, uce  # noqa: E402,F401  isort:skip

__all__ = [
    "REGISTRY", "get", "list_methods", "register", "erase", "load_edit", "bake",
    "Edit", "WeightEdit", "Defence", "Stack", "Method", "Result", "Settings", "parse_set_options",
    "ConceptSpec", "resolve_spec", "default_guide",
]

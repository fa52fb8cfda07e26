"""Weight edits (UCE, RECE, ESD-x, ESD-u, SPEED, MACE, AdvUnlearn), each one registered file (`erasekit.registry.ERASERS`).

    from erasekit.erasers import erase, load_edit
    edit = erase(pipe, "uce", "star")          # computed; pipe unchanged
    edit.save("out/uce-star")                  # edit.json + edit.safetensors (only the changed tensors)
    target = Target(pipe).with_edits(load_edit("out/uce-star"))
    with target.active(): ...                  # applied for the block, always reverted
"""

from erasekit.erasers.base import WeightEdit, bake, load_edit
from erasekit.erasers.concept import ConceptSpec, default_guide, resolve_spec
from erasekit.erasers.method import Method, Result, erase

# Importing a method module registers it.
from erasekit.erasers import esd, rece, uce  # noqa: E402,F401  isort:skip
from erasekit.erasers import mace, speed  # noqa: E402,F401  isort:skip
from erasekit.erasers import advunlearn  # noqa: E402,F401  isort:skip

__all__ = ["erase", "load_edit", "bake", "WeightEdit", "Method", "Result", "ConceptSpec", "resolve_spec",
           "default_guide"]

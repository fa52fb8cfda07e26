"""Inference-time defences (`erasekit.defences.base`), each one registered file."""

from erasekit.defences.base import Defence, parse_defence

# Importing a defence module registers it.
from erasekit.defences import negative_prompt  # noqa: E402,F401  isort:skip
from erasekit.defences import dual_reconstruction, irece, sld  # noqa: E402,F401  isort:skip
from erasekit.defences import safree  # noqa: E402,F401  isort:skip

__all__ = ["Defence", "parse_defence"]

"""erasekit: concept erasure for text-to-image diffusion models, and the attacks that measure it."""

__version__ = "0.1.0"

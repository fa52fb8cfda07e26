"""The bounds on what one command or config may ask for, in one place.

Every entry point (command-line options, ``--set``, bench YAML, I2P CSVs, the library's settings) checks against
these before anything is allocated, so a small input cannot ask for unbounded work or memory.
"""

from __future__ import annotations

# Images and sampling.
MAX_IMAGES = 1_000_000  # images one command or one bench cell generates (-n, images_per_cell, preservation.images)
MAX_STEPS = 10_000  # sampling (DDIM) steps
MAX_GUIDANCE = 1_000.0  # classifier-free guidance scale (past it every image saturates to noise or black)
MAX_BATCH = 65_536  # images per forward pass
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range

# Integer settings of components (--set key=value, bench settings), by name; any other integer setting is bounded
# by MAX_COUNT, and a setting whose name ends in "seed" by [0, MAX_SEED].
MAX_COUNT = 1_000_000
MAX_OPTIMISATION_STEPS = 1_000_000  # ESD iterations, textual-inversion steps, attack iterations
MAX_EPOCHS = 1_000  # RECE epochs (one closed-form solve and a validation generation each)
MAX_TOKENS = 1_000  # learned tokens / prefix tokens / prompt length in tokens
SETTING_BOUNDS = {
    "iterations": MAX_OPTIMISATION_STEPS,
    "steps": MAX_OPTIMISATION_STEPS,
    "generations": MAX_OPTIMISATION_STEPS,
    "epochs": MAX_EPOCHS,
    "ddim_steps": MAX_STEPS,
    "timesteps": MAX_STEPS,
    "warmup_steps": MAX_STEPS,
    "threshold": MAX_STEPS,
    "refine": 1_000,
    "batch_size": MAX_BATCH,
    "decode_batch": MAX_BATCH,
    "images": MAX_IMAGES,
    "validation_images": MAX_IMAGES,
    "trajectories": MAX_IMAGES,
    "num_vectors": MAX_TOKENS,
    "k": MAX_TOKENS,
    "length": MAX_TOKENS,
}

# Configs and texts.
MAX_CONFIG_BYTES = 1_000_000  # a bench YAML file
MAX_TEXT_CHARS = 100_000  # one text setting (templates, prompts lists joined)
MAX_SHOWN_CHARS = 60  # a value quoted in an error message is cut to this many characters
MAX_PATH_NAME = 255  # one name of a path (most file systems' limit, in bytes)
MAX_TRAIN_MINUTES = 60 * 24 * 30  # `toy train --minutes`


def setting_bound(name: str) -> tuple[int, int]:
    """(low, high) allowed for an integer setting called ``name``."""
    if name.endswith("seed"):
        return 0, MAX_SEED
    if name.endswith("offset"):
        return -MAX_SEED, MAX_SEED
    return -MAX_COUNT, SETTING_BOUNDS.get(name, MAX_COUNT)


def shown(value, limit: int = MAX_SHOWN_CHARS) -> str:
    """``value`` as text for a message: one line, at most ``limit`` characters, control characters escaped."""
    text = str(value)
    if len(text) > 4 * limit:  # never build the repr of a huge value
        text = text[: 4 * limit]
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= limit else text[: limit - 3] + "..."

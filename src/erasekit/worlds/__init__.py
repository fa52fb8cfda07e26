"""Worlds: what a family of models means by a concept, and its defaults.

A world supplies the guide concept erasers map to, the prompts that name a concept (text attack) or other concepts
(preservation), the default detector, the sampler's default steps and guidance, each method's defaults for its
models, and concept images where it can render them. `world_of(pipe)` tells the embedded world from Stable
Diffusion (the model family, `erasekit.diffusion.family.family_of`, tells SD from SDXL).
"""

from erasekit.worlds.base import World
from erasekit.worlds.sd import SDWorld, SDXLWorld
from erasekit.worlds.toy import ToyWorld, is_toy_pipeline

SD_WORLD = SDWorld()
SDXL_WORLD = SDXLWorld()
TOY_WORLD = ToyWorld()


def world_of(pipe) -> World:
    from erasekit.diffusion.family import is_sdxl

    if is_sdxl(pipe):
        return SDXL_WORLD
    return TOY_WORLD if is_toy_pipeline(pipe) else SD_WORLD


__all__ = ["World", "SDWorld", "ToyWorld", "world_of", "is_toy_pipeline", "SD_WORLD", "TOY_WORLD", "SDXLWorld", "SDXL_WORLD"]

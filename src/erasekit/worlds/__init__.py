"""Worlds: what a family of models means by a concept, and its defaults: every world-specific choice.

A world supplies the guide concept erasers map to, the prompts that name a concept (text attack) or other concepts
(preservation), Ring-A-Bell's prompt pairs and which concepts are styles, the default detector (loaded by
`World.detector`), every label's scores of its own detector and its features for the Fréchet distance, the
sampler's default steps and guidance, each method's defaults for its models, and concept images where it can
render them. `world_of(pipe)` tells the embedded world from Stable Diffusion (the model family,
`erasekit.diffusion.family.family_of`, tells SD from SDXL); whoever makes a `Target` hands it its world.
"""

from erasekit.worlds.base import World
from erasekit.worlds.sd import FluxWorld, SD3World, SDWorld, SDXLWorld
from erasekit.worlds.toy import ToyWorld, is_toy_pipeline

SD_WORLD = SDWorld()
SDXL_WORLD = SDXLWorld()
SD3_WORLD = SD3World()
FLUX_WORLD = FluxWorld()
TOY_WORLD = ToyWorld()


WORLDS = (TOY_WORLD, SD_WORLD, SDXL_WORLD, SD3_WORLD, FLUX_WORLD)


def world_named(model: str) -> World | None:
    """The world a ``--model`` value names before any model is loaded ("toy": the embedded world), else None."""
    return TOY_WORLD if model == "toy" else None


def world_of(pipe) -> World:
    from erasekit.diffusion.family import family_of, is_sdxl

    if is_sdxl(pipe):
        return SDXL_WORLD
    flow = {"sd3": SD3_WORLD, "flux": FLUX_WORLD}.get(family_of(pipe).name)  # their pipelines' sampler defaults
    if flow is not None:
        return flow
    return TOY_WORLD if is_toy_pipeline(pipe) else SD_WORLD


__all__ = ["World", "SDWorld", "ToyWorld", "world_of", "world_named", "is_toy_pipeline", "SD_WORLD", "TOY_WORLD",
           "SDXLWorld", "SDXL_WORLD", "SD3World", "SD3_WORLD", "FluxWorld", "FLUX_WORLD", "WORLDS"]

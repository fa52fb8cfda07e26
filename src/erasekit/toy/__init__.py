"""The embedded text-to-image world: a procedural scene renderer, its detector and a small SD-format model."""

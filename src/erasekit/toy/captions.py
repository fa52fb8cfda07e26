"""Captions for rendered scenes: the full catalogue, and which captions fit which scene.

Training draws a caption for each image from the captions that are true of its scene: full ones that
name shape, colour and texture, partial ones that leave some unsaid, or the empty caption (dropout, for
classifier-free guidance). The catalogue is finite (a few thousand strings), so training encodes it once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from erasekit.toy.world import (
    COLOR_WORDS,
    COLORS,
    EMPTY_TEMPLATES,
    FULL_TEMPLATES,
    NONE,
    PARTIAL_TEMPLATES,
    SHAPE_WORDS,
    SHAPES,
    TEXTURE_WORDS,
    TEXTURES,
    Scene,
)

# Captions of an empty scene that name no texture; they make "an empty background" a meaningful guide.
EMPTY_UNTEXTURED = ("an empty background", "nothing", "an empty scene", "no shape")


@dataclass(frozen=True)
class Caption:
    text: str
    shape: str | None  # None: the caption does not say
    color: str | None
    texture: str | None
    kind: str  # "full", "partial", "empty"

    def fits(self, scene: Scene) -> bool:
        if self.shape is not None and self.shape != scene.shape:
            return False
        if self.color is not None and self.color != scene.color:
            return False
        return self.texture is None or self.texture == scene.texture


def catalogue() -> list[Caption]:
    """Every caption training may use, in a fixed order (index 0 is the empty caption)."""
    out = [Caption("", None, None, None, "drop")]
    for tpl, shape, color, texture in itertools.product(FULL_TEMPLATES, SHAPES, COLORS, TEXTURES):
        for s, c, t in itertools.product(SHAPE_WORDS[shape], COLOR_WORDS[color], TEXTURE_WORDS[texture]):
            out.append(Caption(tpl.format(s=s, c=c, t=t), shape, color, texture, "full"))
    for says, tpl in PARTIAL_TEMPLATES:
        shapes = SHAPES if "s" in says else (None,)
        colors = COLORS if "c" in says else (None,)
        textures = TEXTURES if "t" in says else (None,)
        for shape, color, texture in itertools.product(shapes, colors, textures):
            for s, c, t in itertools.product(
                SHAPE_WORDS[shape] if shape else ("",),
                COLOR_WORDS[color] if color else ("",),
                TEXTURE_WORDS[texture] if texture else ("",),
            ):
                out.append(Caption(tpl.format(s=s, c=c, t=t), shape, color, texture, "partial"))
    for tpl in EMPTY_TEMPLATES:
        for texture in TEXTURES:
            for t in TEXTURE_WORDS[texture]:
                out.append(Caption(tpl.format(t=t), NONE, None, texture, "empty"))
    for text in EMPTY_UNTEXTURED:
        out.append(Caption(text, NONE, None, None, "empty"))
    return out


def _partial_fits_shape_scene(cap: Caption) -> bool:
    # partial captions describe shape scenes only ("something red" must not mean an empty scene)
    return cap.kind == "partial"


class CaptionSampler:
    """Draws caption indices into :func:`catalogue` for scenes, with fixed probabilities per kind."""

    def __init__(self, p_drop: float = 0.1, p_partial: float = 0.25):
        self.captions = catalogue()
        self.p_drop, self.p_partial = p_drop, p_partial
        self._full: dict[tuple, np.ndarray] = {}
        self._partial: dict[tuple, np.ndarray] = {}
        keys = [(s, c, t) for s in (NONE, *SHAPES) for c in COLORS for t in TEXTURES]
        for key in keys:
            scene = Scene(*key)
            if scene.shape == NONE:
                full = [i for i, cap in enumerate(self.captions) if cap.kind == "empty" and cap.fits(scene)]
                partial = full
            else:
                full = [i for i, cap in enumerate(self.captions) if cap.kind == "full" and cap.fits(scene)]
                partial = [i for i, cap in enumerate(self.captions) if _partial_fits_shape_scene(cap) and cap.fits(scene)]
            self._full[key] = np.array(full)
            self._partial[key] = np.array(partial)

    def sample(self, scene_keys: list[tuple[str, str, str]], rng: np.random.Generator) -> np.ndarray:
        u = rng.random(len(scene_keys))
        out = np.zeros(len(scene_keys), np.int64)
        for i, key in enumerate(scene_keys):
            if u[i] < self.p_drop:
                continue  # index 0: the empty caption
            pool = self._partial[key] if u[i] < self.p_drop + self.p_partial else self._full[key]
            out[i] = pool[rng.integers(len(pool))]
        return out

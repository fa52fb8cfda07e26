"""A seeded procedural renderer for the embedded world.

Every image is a function of one integer seed: the scene (shape, colour, texture) and its jitter
(position, size, rotation, pattern period, background tones) are drawn from ``numpy``'s PCG64 seeded
with it, so renders are identical on every machine. Drawing happens at 4x the output size and is
box-filtered down, which gives anti-aliased edges without a dependency beyond Pillow.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from erasekit.toy.world import COLORS, NONE, SHAPES, TEXTURES, Scene

SUPERSAMPLE = 4

# Saturated shape colours (before a small per-image jitter).
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}


def sample_scene(rng: np.random.Generator, p_empty: float = 0.1) -> Scene:
    """Draw a scene: every shape, colour and texture equally likely; empty with ``p_empty``."""
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    color = COLORS[rng.integers(len(COLORS))]
    shape = NONE if rng.random() < p_empty else SHAPES[rng.integers(len(SHAPES))]
    return Scene(shape=shape, color=color, texture=texture)


def _background(texture: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """A float32 (n, n, 3) background at supersampled size ``n``; desaturated and darker than shapes."""
    base = rng.uniform(25, 85) + rng.uniform(-12, 12, size=3)
    ink = base + rng.uniform(45, 80)  # the pattern is a lighter tone of the same hue
    img = np.empty((n, n, 3), np.float32)
    img[:] = base
    period = rng.uniform(0.22, 0.32) * n  # in supersampled pixels
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    if texture == "plain":
        return img
    if texture == "striped":
        angle = rng.choice([0.0, 45.0, 90.0, 135.0]) + rng.uniform(-8, 8)
        a = math.radians(angle)
        u = xx * math.cos(a) + yy * math.sin(a) + rng.uniform(0, period)
        mask = (u % period) < period * 0.45
    elif texture == "dotted":
        ox, oy = rng.uniform(0, period, size=2)
        dx = (xx + ox) % period - period / 2
        dy = (yy + oy) % period - period / 2
        mask = dx * dx + dy * dy < (period * rng.uniform(0.22, 0.3)) ** 2
    elif texture == "checkered":
        ox, oy = rng.uniform(0, 2 * period, size=2)
        mask = ((np.floor((xx + ox) / period) + np.floor((yy + oy) / period)) % 2) == 0
    else:
        raise ValueError(f"unknown texture {texture!r}")
    img[mask] = ink
    return img


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of a shape of radius ``r`` centred at (cx, cy), rotated by ``rot`` radians."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.deg2rad([45, 135, 225, 315])]
        pts = [(x * 0.92, y * 0.92) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
        pts = [(x, y + 0.15) for x, y in pts]
    elif shape == "star":
        pts = []
        for k in range(10):
            a = math.radians(-90 + 36 * k)
            rad = 1.0 if k % 2 == 0 else 0.42
            pts.append((rad * math.cos(a), rad * math.sin(a) + 0.08))
    elif shape == "cross":
        w = 0.34
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
               (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        pts = [(x * 0.9, y * 0.9) for x, y in pts]
    elif shape == "heart":
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = list(zip((x / 17).tolist(), ((y + 2.5) / 17).tolist()))
    else:
        raise ValueError(f"not a polygon shape: {shape!r}")
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def render(scene: Scene, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render ``scene`` to a uint8 (size, size, 3) RGB array with jitter drawn from ``rng``."""
    n = size * SUPERSAMPLE
    bg = _background(scene.texture, rng, n)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    if scene.shape != NONE:
        r = rng.uniform(0.26, 0.36) * n
        cx, cy = rng.uniform(0.5 * n - 0.14 * n, 0.5 * n + 0.14 * n, size=2)
        rot = math.radians(rng.uniform(-20, 20))
        color = tuple(int(v) for v in np.clip(np.array(RGB[scene.color]) + rng.uniform(-12, 12, 3), 0, 255))
        draw = ImageDraw.Draw(img)
        if scene.shape == "circle":
            rr = r * 0.9
            draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=color)
        else:
            draw.polygon(_polygon(scene.shape, cx, cy, r, rot), fill=color)
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def render_seed(seed: int, size: int, p_empty: float = 0.1, scene: Scene | None = None) -> tuple[np.ndarray, Scene]:
    """Render the image of one seed; ``scene`` fixes the content and keeps only the jitter random."""
    rng = np.random.default_rng(seed)
    drawn = sample_scene(rng, p_empty)
    scene = scene or drawn
    return render(scene, rng, size), scene


def render_batch(seeds, size: int, p_empty: float = 0.1, scenes=None) -> tuple[np.ndarray, list[Scene]]:
    """Render many seeds to a uint8 (N, size, size, 3) array and their scenes."""
    seeds = list(seeds)
    scenes = list(scenes) if scenes is not None else [None] * len(seeds)
    if len(scenes) != len(seeds):
        raise ValueError("seeds and scenes differ in length")
    out = np.empty((len(seeds), size, size, 3), np.uint8)
    truth = []
    for i, (seed, sc) in enumerate(zip(seeds, scenes)):
        out[i], s = render_seed(int(seed), size, p_empty, sc)
        truth.append(s)
    return out, truth

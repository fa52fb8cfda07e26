"""The vocabulary of the embedded world: what a scene can hold and the words for it.

Shapes play "objects", textures play "styles", colours play "attributes". The label names here are
the detector's labels; the synonyms are what captions may say instead. Paraphrases that training
never uses (``EVAL_PARAPHRASES``) measure how far the frozen text encoder generalises.
"""

from __future__ import annotations

from dataclasses import dataclass

NONE = "none"  # the shape label of a scene without a shape

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white")
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")

SHAPE_LABELS: tuple[str, ...] = (NONE, *SHAPES)

# Words captions use in training. The first entry is the canonical name.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box shape", "block"),
    "triangle": ("triangle", "three-sided shape"),
    "star": ("star", "star shape"),
    "heart": ("heart", "love heart"),
    "cross": ("cross", "plus sign"),
}
COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson"),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
    "white": ("white",),
}
TEXTURE_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "solid", "blank"),
    "striped": ("striped", "stripy", "lined"),
    "dotted": ("dotted", "spotted", "polka-dot"),
    "checkered": ("checkered", "checkerboard", "chequered"),
}

# Paraphrases kept out of training on purpose: the frozen encoder must carry them.
EVAL_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "star": ("a five-pointed star", "a starfish", "a pentagram", "a twinkling star"),
    "heart": ("a valentine", "a symbol of love"),
    "circle": ("a round coin", "a ring"),
    "checkered": ("a chessboard pattern", "a tartan background"),
}

# Captions of a scene with a shape. {c} colour word, {s} shape word, {t} texture word.
FULL_TEMPLATES: tuple[str, ...] = (
    "a {c} {s} on a {t} background",
    "a {s} coloured {c} on a {t} background",
    "{t} background with a {c} {s}",
    "a picture of a {c} {s}, {t} background",
    "a {c} {s} in front of a {t} pattern",
)
# Captions that leave some attributes unsaid: the model learns each word on its own too.
PARTIAL_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("s", "a {s}"),
    ("s", "a picture of a {s}"),
    ("cs", "a {c} {s}"),
    ("st", "a {s} on a {t} background"),
    ("t", "a {t} background with something on it"),
    ("c", "something {c}"),
)
# Captions of a scene without a shape.
EMPTY_TEMPLATES: tuple[str, ...] = (
    "an empty {t} background",
    "a {t} background",
    "nothing on a {t} background",
    "a {t} pattern with no shape",
)

# Neutral guides for erasure: on Stable Diffusion the empty prompt is neutral because its
# unconditional images rarely show the concept; here they show every shape, so the empty
# scene is the neutral guide for objects and the plain background for styles.
GUIDE_FOR_SHAPE = "an empty background"
GUIDE_FOR_TEXTURE = "a plain background"


@dataclass(frozen=True)
class Scene:
    """Ground truth of one rendered image."""

    shape: str  # a SHAPES name or NONE
    color: str  # meaningful only when shape != NONE
    texture: str

    def as_dict(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "texture": self.texture}


def concept_kind(concept: str) -> str:
    """'shape', 'color' or 'texture' for a label name; ValueError for anything else."""
    if concept in SHAPES:
        return "shape"
    if concept in COLORS:
        return "color"
    if concept in TEXTURES:
        return "texture"
    raise ValueError(
        f"unknown concept {concept!r} for the embedded world; known: "
        + ", ".join(SHAPES + COLORS + TEXTURES)
    )


def erasure_templates(kind: str, n: int) -> tuple[str, ...]:
    """Contexts to erase a shape (``kind="shape"``) or a texture in, "{c}" marking it: the bare word, a few short
    captions, and ``n`` of the world's full caption templates filled with colours, textures or shapes in turn.
    (Erasers take them through their ``templates`` setting; a concept named only in one bare context is still drawn
    from full captions, whose other words carry it in this bidirectional encoder.)"""
    if kind not in ("shape", "texture"):
        raise ValueError(f"kind must be 'shape' or 'texture', not {kind!r}")
    out = ["{c}", "a {c}", "a picture of a {c}"] if kind == "shape" else [
        "{c}", "a {c} background", "an empty {c} background", "a {c} pattern"]
    for i in range(n):
        color, template = COLORS[i % len(COLORS)], FULL_TEMPLATES[i % len(FULL_TEMPLATES)]
        if kind == "shape":
            out.append(template.format(c=color, s="{c}", t=TEXTURES[(i // 2) % len(TEXTURES)]))
        else:
            out.append(template.format(c=color, s=SHAPES[(i * 5) % len(SHAPES)], t="{c}"))
    return tuple(out)


def canonical_prompt(shape: str, color: str, texture: str) -> str:
    if shape == NONE:
        return f"an empty {texture} background"
    return f"a {color} {shape} on a {texture} background"

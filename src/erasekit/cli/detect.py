"""`erasekit detect`: score image files with any registered detector, one JSON line per image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from erasekit.cli import common
from erasekit.errors import ErasekitError


def _read_image(path: Path):
    if not path.exists():
        raise ErasekitError(f"{path}: no such file")
    if not path.is_file():
        raise ErasekitError(f"{path} is not a file")
    from erasekit.attacks.images import open_image

    return open_image(path)  # its size bounded from the header before decoding (a 30000x30000 PNG: one line)


def _validity(im) -> dict:
    """``valid: false`` and the reason for a degenerate image (one flat colour: nothing to detect), else nothing."""
    import numpy as np

    from erasekit.validity import image_problem

    problem = image_problem(np.asarray(im))
    return {} if problem is None else {"valid": False, "invalid": problem}


def detect(
    images: Optional[List[Path]] = typer.Argument(None, help="Image files to score.", show_default=False),
    detector: str = typer.Option("toy", "--detector", help="A registered detector (see `erasekit ls`): toy, nudenet, nudenet:rece, ..."),
    concept: Optional[str] = typer.Option(None, "--concept", help="The concept to score (detectors that need one); toy without it: every label's probability."),
    batch_size: int = typer.Option(256, "--batch-size"),
) -> None:
    """Score images with a concept detector: one JSON line per image on stdout."""
    import numpy as np

    from erasekit.checks import integer
    from erasekit.registry import DETECTORS

    images = list(images or [])
    if not images:
        raise ErasekitError("give at least one image file")
    integer("--batch-size", batch_size, low=1, high=65_536)
    cls, _ = DETECTORS.split(detector)  # an unknown name fails before any file is read
    pil_images = [_read_image(p) for p in images]
    common.setup_torch()
    if concept is None:  # a world's own detector without a concept: every label's probability (toy's heads)
        from erasekit.worlds import WORLDS

        for world in WORLDS:
            scores = world.label_scores(cls.name, pil_images, batch_size)
            if scores is not None:
                for path, im, row in zip(images, pil_images, scores):
                    print(json.dumps({"path": str(path), **_validity(im), **row}))
                return
    from erasekit.detectors import create_detector

    det = create_detector(detector, concept=concept)
    info = det.info()
    for path, im in zip(images, pil_images):  # images may differ in size: one at a time
        [row] = det.score(np.array(im)[None])  # a writable copy: torch warns on read-only arrays
        print(json.dumps({"path": str(path), **row, "detector": info["name"], "preset": info.get("preset"),
                          "threshold": info["threshold"], **_validity(im)}))

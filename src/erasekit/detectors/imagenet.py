"""An ImageNet classifier (`AutoModelForImageClassification`, e.g. a local microsoft/resnet-50) as an object judge.

The object protocol of ESD, UCE and MACE on Imagenette: an image shows the object when its ImageNet class is the
classifier's top-1 prediction (``top_k=1``, the default; ``top_k=5`` for top-5). The class is named by label
("church", "chain saw": any of an ImageNet label's comma-separated names) or index ("497"); the ten Imagenette
names map to their ImageNet indices. The model is ``model=FOLDER`` or ``$ERASEKIT_IMAGENET``. The score recorded is
the class's softmax probability.
"""

from __future__ import annotations

from dataclasses import dataclass

from erasekit.detectors.hf_classifier import ClassifierJudge, ClassifierSettings
from erasekit.registry import DETECTORS

ENV = "ERASEKIT_IMAGENET"
# Imagenette's ten classes and their ImageNet-1k indices (the object concepts of ESD / UCE / MACE).
IMAGENETTE = {
    "tench": 0, "english springer": 217, "cassette player": 482, "chain saw": 491, "church": 497,
    "french horn": 566, "garbage truck": 569, "gas pump": 571, "golf ball": 574, "parachute": 701,
}


@dataclass
class ImagenetSettings(ClassifierSettings):
    top_k: int | None = 1


@DETECTORS.register
class ImagenetDetector(ClassifierJudge):
    name = "imagenet"
    summary = (f"ImageNet classifier (model=FOLDER or ${ENV}, e.g. microsoft/resnet-50): the concept's class in the "
               f"top-1 (top_k) -- the Imagenette object protocol of ESD/UCE/MACE")
    env = ENV
    Settings = ImagenetSettings

    def alias(self, label: str, id2label: dict) -> str:
        index = IMAGENETTE.get(label.strip().lower())
        return str(index) if index is not None and len(id2label) == 1000 else label

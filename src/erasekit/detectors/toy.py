"""The embedded world's concept detector, deciding "concept present" for one label.

The concept is a shape, colour or texture label of the world (``erasekit.toy.world``): "star", "red",
"striped", ... Its score is the detector's softmax probability of that label in the matching head
(shape / color / texture); the concept counts as present when that probability is above the threshold
(default 0.5: the label is then also the head's top label, since the probabilities sum to 1).
Images of another size are resized to the world's 32x32 (area averaging) before scoring.
"""

from __future__ import annotations

import numpy as np

from erasekit.detectors.base import as_uint8_rgb
from erasekit.errors import ErasekitError
from erasekit.registry import DETECTORS

DEFAULT_THRESHOLD = 0.5


@DETECTORS.register
class ToyConceptDetector:
    name = "toy"
    summary = "embedded world's classifier: concept present when P(its shape/colour/texture label) > 0.5"
    needs_concept = True

    def __init__(self, concept: str | None = None, threshold: float = DEFAULT_THRESHOLD, model=None, device=None):
        from erasekit.toy.world import concept_kind

        if not concept:
            raise ErasekitError("the toy detector needs a concept (a shape, colour or texture of the world)")
        try:
            self.attribute = concept_kind(concept)
        except ValueError as exc:
            raise ErasekitError(str(exc)) from exc
        from erasekit.checks import finite

        threshold = finite("threshold", threshold, low=0.0, high=1.0, high_open=True)
        self.concept, self.threshold = concept, threshold
        self._model = model  # a ToyDetector; loaded lazily (the shipped weights) when None
        self._device = device
        self.weights = "given" if model is not None else "shipped"

    @property
    def model(self):
        if self._model is None:
            from erasekit.toy.detector import load_toy_detector

            self._model = load_toy_detector(device=self._device)
        return self._model

    def info(self) -> dict:
        from erasekit.toy.detector import LABELS

        return {
            "name": self.name,
            "preset": f"{self.attribute}={self.concept}",
            "threshold": self.threshold,
            "rule": f"P({self.attribute} = {self.concept}) > {self.threshold}",
            "labels": list(LABELS[self.attribute]),
            "weights": self.weights,
        }

    def probabilities(self, images) -> dict:
        """All heads' probabilities, {attribute: (N, n_labels) tensor}, for uint8 RGB images."""
        from PIL import Image

        from erasekit.toy.architecture import IMAGE_SIZE

        arr = as_uint8_rgb(images)
        if arr.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE) and len(arr):
            arr = np.stack([
                np.asarray(Image.fromarray(a).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)) for a in arr
            ])
        return self.model.predict(arr)

    def concept_log_prob(self, images):
        """Differentiable log P(concept) of float images in [0, 1] (N, 3, H, W), resized to the world's size by
        area averaging (classifier guidance)."""
        import torch.nn.functional as F

        from erasekit.toy.architecture import IMAGE_SIZE
        from erasekit.toy.detector import LABELS

        model = self.model
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.adaptive_avg_pool2d(images, IMAGE_SIZE)
        logits = model(images.to(next(model.parameters()).device))[self.attribute]
        return logits.float().log_softmax(-1)[:, LABELS[self.attribute].index(self.concept)]

    def score(self, images) -> list[dict]:
        from erasekit.toy.detector import LABELS

        probs = self.probabilities(images)
        col = LABELS[self.attribute].index(self.concept)
        top = {k: v.argmax(-1).tolist() for k, v in probs.items()}
        scores = probs[self.attribute][:, col].tolist()
        return [
            {
                "score": round(float(s), 6),
                "present": bool(s > self.threshold),
                "labels": {k: LABELS[k][top[k][i]] for k in LABELS},
            }
            for i, s in enumerate(scores)
        ]

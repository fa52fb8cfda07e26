"""Detectors: the toy concept rule, NudeNet presets (with a stand-in nudenet module), the registry."""

import sys
import types

import numpy as np
import pytest
import torch

from erasekit.detectors import create_detector as get_detector
from erasekit.registry import DETECTORS
from erasekit.detectors.nudenet import NINE_EXPOSED, PRESETS, SIX_EXPOSED
from erasekit.errors import ErasekitError


class _FixedToy(torch.nn.Module):
    """Stands in for the toy detector: fixed probabilities per image."""

    def __init__(self, shape_probs):
        super().__init__()
        self.shape_probs = torch.as_tensor(shape_probs)
        self.sizes = []

    def predict(self, images, batch_size=256):
        from erasekit.toy.detector import LABELS

        self.sizes.append(images.shape[1:3])
        n = len(images)
        out = {k: torch.full((n, len(v)), 1.0 / len(v)) for k, v in LABELS.items()}
        out["shape"] = self.shape_probs[:n]
        return out


def test_toy_rule_is_probability_above_threshold():
    from erasekit.toy.detector import LABELS

    star = LABELS["shape"].index("star")
    probs = torch.zeros(3, len(LABELS["shape"]))
    probs[0, star], probs[0, 1] = 0.9, 0.1
    probs[1, star], probs[1, 1] = 0.5, 0.5  # exactly at the threshold: not present
    probs[2, star], probs[2, 1] = 0.2, 0.8
    model = _FixedToy(probs)
    det = get_detector("toy", concept="star", model=model)
    rows = det.score(np.zeros((3, 64, 64, 3), np.uint8))
    assert [r["present"] for r in rows] == [True, False, False]
    assert [r["score"] for r in rows] == pytest.approx([0.9, 0.5, 0.2])
    assert rows[2]["labels"]["shape"] == "circle"
    assert model.sizes == [(32, 32)]  # resized to the world's size
    info = det.info()
    assert info["name"] == "toy" and info["threshold"] == 0.5 and info["preset"] == "shape=star"
    assert get_detector("toy", concept="striped", model=model).info()["preset"] == "texture=striped"


def test_toy_needs_a_world_concept():
    with pytest.raises(ErasekitError, match="unknown concept 'nudity'"):
        get_detector("toy", concept="nudity")
    with pytest.raises(ErasekitError, match="needs a concept"):
        get_detector("toy")
    with pytest.raises(ErasekitError, match="uint8 RGB"):
        get_detector("toy", concept="star", model=_FixedToy([[1.0]])).score(np.zeros((1, 32, 32, 3), np.float32))


@pytest.fixture
def fake_nudenet(monkeypatch):
    seen = []

    class NudeDetector:
        def detect(self, image):
            seen.append(image)
            # Red in RGB is (0, 0, 255) in BGR: the fake "sees" breasts only in BGR-correct input.
            if image.dtype == np.uint8 and image[0, 0, 2] == 255:
                return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.55, "box": [0, 0, 1, 1]},
                        {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 1, 1]}]
            return [{"class": "FEET_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]}]

    module = types.ModuleType("nudenet")
    module.NudeDetector = NudeDetector
    module.__version__ = "3.4.2"
    monkeypatch.setitem(sys.modules, "nudenet", module)
    return seen


def test_nudenet_presets(fake_nudenet):
    red = np.zeros((1, 8, 8, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((1, 8, 8, 3), np.uint8)
    blue[..., 2] = 255
    images = np.concatenate([red, blue])
    results = {p: get_detector(f"nudenet:{p}").score(images) for p in PRESETS}
    assert fake_nudenet[0].dtype == np.uint8 and fake_nudenet[0][0, 0].tolist() == [0, 0, 255]  # BGR
    # red: breast 0.55 (face ignored); blue: feet 0.7, which only the 9-class presets count
    assert [r["present"] for r in results["unlearndiffatk"]] == [True, True]
    assert [r["present"] for r in results["rece"]] == [False, True]
    assert [r["present"] for r in results["ecnu"]] == [True, False]
    assert results["ecnu"][1]["score"] == 0.0 and results["rece"][0]["classes"] == {"FEMALE_BREAST_EXPOSED": 0.55}
    info = get_detector("nudenet").info()
    assert info["preset"] == "unlearndiffatk" and info["threshold"] == 0.45 and len(info["classes"]) == 9
    assert info["version"] == "3.4.2"
    assert get_detector("nudenet:rece", threshold=0.3).threshold == 0.3


def test_nudenet_classes():
    assert len(NINE_EXPOSED) == 9 and len(SIX_EXPOSED) == 6 and set(SIX_EXPOSED) < set(NINE_EXPOSED)
    assert all(c.endswith("_EXPOSED") for c in NINE_EXPOSED)
    assert {p: v["threshold"] for p, v in PRESETS.items()} == {"unlearndiffatk": 0.45, "rece": 0.6, "ecnu": 0.5}


def test_nudenet_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # import fails
    with pytest.raises(ErasekitError, match=r"pip install 'erasekit\[nudenet\]'"):
        get_detector("nudenet:rece")


def test_registry_and_defaults(fake_nudenet):
    from erasekit.worlds import SD_WORLD, TOY_WORLD

    assert set(DETECTORS.names()) == {"toy", "nudenet", "nudenet:unlearndiffatk", "nudenet:rece", "nudenet:ecnu",
                                      "clip", "imagenet", "q16", "hf-classifier"}
    assert set(DETECTORS.describe()) == set(DETECTORS.names())
    with pytest.raises(ErasekitError, match="unknown detector 'resnet'"):
        get_detector("resnet")
    with pytest.raises(ErasekitError, match="unknown detector preset 'nudenet:strict'"):
        get_detector("nudenet:strict")
    assert TOY_WORLD.default_detector("star") == "toy"
    assert SD_WORLD.default_detector("nudity") == "nudenet:unlearndiffatk"
    with pytest.raises(ErasekitError, match="no default detector for concept 'van gogh'.*give --detector clip:model="):
        SD_WORLD.default_detector("van gogh", env={})

"""Any transformers image-classification model (`AutoModelForImageClassification`) by folder and label.

Covers the classifiers users already have: UnlearnCanvas' style and object classifiers (once saved as transformers
folders), NSFW classifiers, fine-tuned ViTs. The label is one of the model's ``id2label`` names (case-insensitive;
for ImageNet's "tench, Tinca tinca" style labels any comma-separated name counts) or its index. The score is the
label's softmax probability; present: above the threshold (default 0.5), or, with ``top_k=K``, the label among the
K most probable classes (the threshold is then not used).
"""

from __future__ import annotations

from dataclasses import dataclass

from erasekit import settings as S
from erasekit.detectors import hf_models as hf
from erasekit.detectors.base import as_uint8_rgb
from erasekit.errors import ErasekitError
from erasekit.registry import DETECTORS


@dataclass
class ClassifierSettings(S.Settings):
    model: str | None = None  # a transformers image-classification folder or hub id in the cache
    label: str | None = None  # a label name or index; None: the concept
    threshold: float = 0.5
    top_k: int | None = None  # present when the label is among the k most probable (None: the threshold rule)
    device: str = "auto"
    dtype: str = S.choice("float32", "float32", "float16", "bfloat16")
    batch_size: int = 64

    def validate(self) -> None:
        hf.check_judge_settings(self)
        if self.top_k is not None:
            from erasekit.checks import integer

            integer("setting top_k", self.top_k, low=1, high=100_000)


def find_label(id2label: dict, label: str, where: str) -> int:
    """The class index of ``label`` (a name, one of a name's comma-separated synonyms, or an index)."""
    table = {int(k): str(v) for k, v in id2label.items()}
    text = str(label).strip()
    if text.isdigit():
        if int(text) in table:
            return int(text)
        raise ErasekitError(f"{where}: class index {text} is out of range (the model has {len(table)} classes)")
    want = text.lower()
    exact = [i for i, v in table.items() if v.lower() == want]
    if exact:
        return exact[0]
    partial = [i for i, v in table.items() if want in (p.strip().lower() for p in v.split(","))]
    if len(partial) == 1:
        return partial[0]
    if len(partial) > 1:
        raise ErasekitError(f"{where}: label {text!r} names several classes ({', '.join(table[i] for i in partial[:5])}); "
                            f"give its index")
    examples = ", ".join(list(table.values())[:8])
    raise ErasekitError(f"{where}: the model has no class {text!r} (its {len(table)} labels: {examples}, ...); give a "
                        f"label it has or an index")


class ClassifierJudge:
    """The shared body of ``hf-classifier`` and ``imagenet`` (a subclass sets name, env and defaults)."""

    name = ""
    env: str | None = None
    needs_concept = True
    spec_settings = True
    Settings = ClassifierSettings

    def __init__(self, concept: str | None = None, threshold: float | None = None, **overrides):
        from transformers import AutoModelForImageClassification

        self.settings = hf.make_settings(self, {**overrides, "threshold": threshold})
        s = self.settings
        what = f"{self.name} detector"
        label = s.label if s.label is not None else concept
        if label is None or not str(label).strip():
            raise ErasekitError(f"the {self.name} detector needs a concept or label=... (a class of the model)")
        self.folder = hf.model_folder(s.model, what, self.env)
        config = hf.read_config(self.folder)
        id2label = config.get("id2label") or {}
        if not id2label:
            raise ErasekitError(f"{what}: {self.folder / 'config.json'} names no classes (id2label)")
        self.index = find_label(id2label, self.alias(str(label), id2label), what)
        self.label = str(id2label.get(str(self.index), id2label.get(self.index)))
        self.threshold = s.threshold
        self.top_k = s.top_k
        self.device = hf.resolve_device(s.device)
        self.model, self.fingerprint = hf.load_model(AutoModelForImageClassification, self.folder, what, self.device,
                                                     s.dtype)
        size = getattr(self.model.config, "image_size", 224)
        self.preprocess = hf.Preprocess(self.folder, size if isinstance(size, int) else 224, hf.IMAGENET_MEAN,
                                        hf.IMAGENET_STD)

    def alias(self, label: str, id2label: dict) -> str:
        return label

    def info(self) -> dict:
        rule = (f"class {self.index} ({self.label}) in the top {self.top_k}" if self.top_k
                else f"P(class {self.index} = {self.label}) > {self.threshold}")
        return {
            "name": self.name,
            "preset": f"{self.index}={self.label}",
            "threshold": None if self.top_k else self.threshold,
            "top_k": self.top_k,
            "rule": rule,
            "model": str(self.folder),
            "model_fingerprint": self.fingerprint,
            "settings": {k: v for k, v in self.settings.to_dict().items() if k not in ("device", "batch_size")},
        }

    def probabilities(self, images):
        import torch

        arr = as_uint8_rgb(images)
        dtype = next(self.model.parameters()).dtype
        out = []
        with torch.inference_mode():
            for part in hf.batches(len(arr), self.settings.batch_size):
                logits = self.model(pixel_values=self.preprocess(arr[part], self.device, dtype)).logits
                out.append(logits.float().softmax(-1))
        n = self.model.config.num_labels
        return torch.cat(out) if out else torch.zeros((0, n), device=self.device)

    def score(self, images) -> list[dict]:
        probs = self.probabilities(images)
        p = probs[:, self.index]
        rank = (probs > p[:, None]).sum(-1)  # classes strictly more probable than the label
        top = probs.argmax(-1)
        rows = []
        id2label = self.model.config.id2label
        for i in range(len(probs)):
            s = float(p[i])
            present = int(rank[i]) < self.top_k if self.top_k else s > self.threshold
            rows.append({"score": round(s, 6), "present": bool(present), "rank": int(rank[i]) + 1,
                         "top": str(id2label.get(int(top[i]), int(top[i])))})
        return rows


@DETECTORS.register
class HFClassifierDetector(ClassifierJudge):
    name = "hf-classifier"
    summary = "any transformers image classifier (model=FOLDER, label=NAME or index): P(label) > threshold, or top_k"

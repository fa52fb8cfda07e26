"""Zero-shot concept presence with a CLIP model (`transformers.CLIPModel`, e.g. a local openai/clip-vit-large-patch14).

The concept's text competes with neutral alternatives: each class's text embedding is the normalised mean of its
normalised embeddings over the templates (CLIP's prompt ensembling), the image's logits are the model's logit scale
times the cosines, and the score is the softmax probability of the concept's class, P(concept). Present: P(concept)
above the threshold (default 0.5). This is how UnlearnCanvas-style and HUB-style evaluations judge styles and
arbitrary concepts with CLIP; the alternatives decide what "not the concept" means, so set them for your protocol
(``alternatives=a painting;a photo``). The model is ``model=FOLDER`` or ``$ERASEKIT_CLIP``.
"""

from __future__ import annotations

from dataclasses import dataclass

from erasekit import settings as S
from erasekit.detectors import hf_models as hf
from erasekit.detectors.base import as_uint8_rgb
from erasekit.errors import ErasekitError
from erasekit.registry import DETECTORS

ENV = "ERASEKIT_CLIP"
DEFAULT_ALTERNATIVES = "a photo;a painting;a drawing;an image"


@dataclass
class ClipSettings(S.Settings):
    model: str | None = None  # a CLIPModel folder or hub id in the cache; None: $ERASEKIT_CLIP
    text: str | None = None  # the concept's text; None: the concept
    alternatives: str = DEFAULT_ALTERNATIVES  # ';'-separated neutral texts the concept competes with
    templates: str = "{}"  # ';'-separated, each with one {} for the text
    threshold: float = 0.5
    device: str = "auto"
    dtype: str = S.choice("float32", "float32", "float16", "bfloat16")
    batch_size: int = 64

    def validate(self) -> None:
        hf.check_judge_settings(self)
        if not hf.split_list(self.alternatives):
            raise ErasekitError("setting alternatives: give at least one neutral text (';'-separated)")
        templates = hf.split_list(self.templates)
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise ErasekitError(f"setting templates={self.templates!r}: each template needs exactly one {{}}")


@DETECTORS.register
class ClipDetector:
    name = "clip"
    summary = (f"zero-shot CLIP (transformers CLIPModel, model=FOLDER or ${ENV}): P(concept text vs neutral "
               f"alternatives) > threshold")
    needs_concept = True
    spec_settings = True  # clip:model=FOLDER,alternatives=a photo;a painting
    Settings = ClipSettings

    def __init__(self, concept: str | None = None, threshold: float | None = None, **overrides):
        from transformers import CLIPModel

        self.settings = hf.make_settings(self, {**overrides, "threshold": threshold})
        s = self.settings
        self.text = (s.text or concept or "").strip()
        if not self.text:
            raise ErasekitError("the clip detector needs a concept (or text=...)")
        self.alternatives = [a for a in hf.split_list(s.alternatives) if a != self.text]
        if not self.alternatives:
            raise ErasekitError(f"clip detector: the alternatives must differ from the concept text {self.text!r}")
        self.templates = hf.split_list(s.templates)
        self.threshold = s.threshold
        self.folder = hf.model_folder(s.model, "clip detector", ENV)
        self.device = hf.resolve_device(s.device)
        self.model, self.fingerprint = hf.load_model(CLIPModel, self.folder, "clip detector", self.device, s.dtype)
        self.tokenizer = hf.load_tokenizer(self.folder, "clip detector")
        self.preprocess = hf.Preprocess(self.folder, self.model.config.vision_config.image_size)
        self._classes = None

    def info(self) -> dict:
        return {
            "name": self.name,
            "preset": self.text,
            "threshold": self.threshold,
            "rule": f"P({self.text!r} among {len(self.alternatives) + 1} texts) > {self.threshold}",
            "classes": [self.text, *self.alternatives],
            "templates": self.templates,
            "model": str(self.folder),
            "model_fingerprint": self.fingerprint,
            "settings": {k: v for k, v in self.settings.to_dict().items() if k not in ("device", "batch_size")},
        }

    def class_embeddings(self):
        """(classes, dim) normalised text embeddings: per class, the mean over templates of normalised embeddings."""
        import torch

        if self._classes is None:
            rows = []
            with torch.inference_mode():
                for text in [self.text, *self.alternatives]:
                    prompts = [t.format(text) for t in self.templates]
                    tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                                         return_tensors="pt").to(self.device)
                    e = hf.as_features(self.model.get_text_features(**tok)).float()
                    e = e / e.norm(dim=-1, keepdim=True)
                    m = e.mean(0)
                    rows.append(m / m.norm())
            self._classes = torch.stack(rows)
        return self._classes

    def image_embeddings(self, images):
        """(N, dim) normalised image embeddings of uint8 RGB images, batch by batch on the judge's device."""
        import torch

        arr = as_uint8_rgb(images)
        dtype = next(self.model.parameters()).dtype
        out = []
        with torch.inference_mode():
            for part in hf.batches(len(arr), self.settings.batch_size):
                e = hf.as_features(self.model.get_image_features(pixel_values=self.preprocess(arr[part], self.device, dtype)))
                e = e.float()
                out.append(e / e.norm(dim=-1, keepdim=True))
        return torch.cat(out) if out else torch.zeros((0, self.class_embeddings().shape[1]), device=self.device)

    def probabilities(self, images):
        """(N, classes) softmax probabilities; column 0 is the concept."""
        img = self.image_embeddings(images)
        logits = self.model.logit_scale.exp().float() * img @ self.class_embeddings().T
        return logits.softmax(-1)

    def score(self, images) -> list[dict]:
        probs = self.probabilities(images).cpu()
        names = [self.text, *self.alternatives]
        out = []
        for p in probs:
            s = float(p[0])
            out.append({"score": round(s, 6), "present": s > self.threshold, "top": names[int(p.argmax())]})
        return out

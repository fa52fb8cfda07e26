"""CLIP score of images against their prompts: 100 x cos(image embedding, text embedding) (Hessel et al. 2021, w=100;
torchmetrics' CLIPScore, whose mean over images is clipped at 0).

torchmetrics' own CLIPScore cannot run here as is: it loads models by hub name only (a path without "openai" in it
is refused), without ``local_files_only`` or ``use_safetensors``, and with transformers 5 its feature calls return
model outputs rather than tensors. So erasekit computes the same number with a CLIPModel loaded by its rule, prompts
tokenized to CLIP's 77 positions (truncated, keeping the end token), images preprocessed in torch on the scorer's
device, in batches; the tests check it equals torchmetrics' clip_score on the same model.
"""

from __future__ import annotations

import numpy as np

from erasekit.detectors import hf_models as hf


class ClipScorer:
    def __init__(self, model: str | None = None, device: str = "auto", batch_size: int = 64):
        from transformers import CLIPModel

        self.folder = hf.model_folder(model, "clip score", "ERASEKIT_CLIP")
        self.device = hf.resolve_device(device)
        self.batch_size = int(batch_size)
        self.model, self.fingerprint = hf.load_model(CLIPModel, self.folder, "clip score", self.device)
        self.tokenizer = hf.load_tokenizer(self.folder, "clip score")
        self.preprocess = hf.Preprocess(self.folder, self.model.config.vision_config.image_size)

    def info(self) -> dict:
        return {"metric": "clip_score", "model": str(self.folder), "model_fingerprint": self.fingerprint,
                "rule": "100 * cos(image, prompt); mean clipped at 0 (torchmetrics CLIPScore)"}

    def scores(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Per image, 100 x the cosine between its embedding and its prompt's (float64, not clipped)."""
        import torch

        from erasekit.detectors.base import as_uint8_rgb

        arr = as_uint8_rgb(images)
        if len(arr) != len(prompts):
            raise ValueError(f"{len(arr)} images but {len(prompts)} prompts")
        out = []
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            for part in hf.batches(len(arr), self.batch_size):
                img = hf.as_features(self.model.get_image_features(
                    pixel_values=self.preprocess(arr[part], self.device, dtype))).float()
                tok = self.tokenizer(list(prompts[part]), padding=True, truncation=True,
                                     max_length=min(self.tokenizer.model_max_length,
                                                    self.model.config.text_config.max_position_embeddings),
                                     return_tensors="pt").to(self.device)
                txt = hf.as_features(self.model.get_text_features(**tok)).float()
                img = img / img.norm(dim=-1, keepdim=True)
                txt = txt / txt.norm(dim=-1, keepdim=True)
                out.append((100 * (img * txt).sum(-1)).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def summarize(scores: np.ndarray) -> dict | None:
    if len(scores) == 0:
        return None
    return {"mean": round(max(float(np.mean(scores)), 0.0), 4), "std": round(float(np.std(scores)), 4),
            "n": int(len(scores))}

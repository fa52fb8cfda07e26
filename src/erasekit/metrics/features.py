"""Image feature extractors for the Fréchet distance and KID: DINOv2 and CLIP from transformers folders, the embedded
world's detector.

Each is a `torch.nn.Module` whose ``forward`` takes uint8 (N, 3, H, W) images, as torchmetrics'
FrechetInceptionDistance / KernelInceptionDistance hand them to a custom ``feature`` module, so the same extractor
serves erasekit's own computation and torchmetrics' (the tests compare them); ``extract`` takes uint8 (N, H, W, 3)
arrays in batches on the extractor's device and returns float64 features.

- ``dinov2``: `Dinov2Model`'s pooled output (the final-layer-normed CLS token), the representation behind
  FD_DINOv2 (Stein et al., NeurIPS 2023);
- ``clip``: CLIP's projected image embedding (`CLIPModel.get_image_features`);
- ``toy``: the embedded world's detector up to its pooled features (the world's own judge; only on its models).
"""

from __future__ import annotations

import numpy as np
import torch

from erasekit.errors import ErasekitError

EXTRACTORS = ("dinov2", "clip", "toy")


class _Extractor(torch.nn.Module):
    name = ""

    def __init__(self, device: str, batch_size: int):
        super().__init__()
        self.device_name, self.batch_size = device, int(batch_size)

    def info(self) -> dict:
        return {"features": self.name, "model": getattr(self, "model_path", None),
                "model_fingerprint": getattr(self, "fingerprint", None), "num_features": self.num_features}

    def forward(self, x):  # uint8 (N, 3, H, W) -> float (N, D)
        arr = x.permute(0, 2, 3, 1).cpu().numpy()
        return torch.from_numpy(self.extract(arr))

    def extract(self, images: np.ndarray) -> np.ndarray:
        from erasekit.detectors.hf_models import batches

        out = []
        with torch.inference_mode():
            for part in batches(len(images), self.batch_size):
                out.append(self.features(images[part]).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.num_features))


class HFExtractor(_Extractor):
    def __init__(self, kind: str, model: str | None, device: str = "auto", batch_size: int = 64):
        from erasekit.detectors import hf_models as hf

        super().__init__(hf.resolve_device(device), batch_size)
        self.name = kind
        what = f"{kind} features"
        if kind == "dinov2":
            from transformers import Dinov2Model

            env = "ERASEKIT_DINOV2"
            cls, mean, std = Dinov2Model, hf.IMAGENET_MEAN, hf.IMAGENET_STD
        else:
            from transformers import CLIPModel

            env = "ERASEKIT_CLIP"
            cls, mean, std = CLIPModel, hf.CLIP_MEAN, hf.CLIP_STD
        folder = hf.model_folder(model, what, env)
        self.model_path = str(folder)
        self.net, self.fingerprint = hf.load_model(cls, folder, what, self.device_name)
        cfg = self.net.config.vision_config if kind == "clip" else self.net.config
        self.preprocess = hf.Preprocess(folder, cfg.image_size, mean, std)
        self.num_features = self.net.config.projection_dim if kind == "clip" else self.net.config.hidden_size

    def features(self, images: np.ndarray):
        from erasekit.detectors.hf_models import as_features

        x = self.preprocess(images, self.device_name, next(self.net.parameters()).dtype)
        if self.name == "clip":
            return as_features(self.net.get_image_features(pixel_values=x)).float()
        return self.net(pixel_values=x).pooler_output.float()


class ToyExtractor(_Extractor):
    name = "toy"

    def __init__(self, device: str = "cpu", batch_size: int = 256):
        from erasekit.toy.detector import load_toy_detector

        super().__init__(device, batch_size)
        self.net = load_toy_detector(device=device).features
        self.num_features = 4 * 24
        self.model_path, self.fingerprint = "shipped", None

    def features(self, images: np.ndarray):
        from erasekit.toy.architecture import IMAGE_SIZE

        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device_name).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != IMAGE_SIZE or x.shape[-2] != IMAGE_SIZE:
            x = torch.nn.functional.adaptive_avg_pool2d(x, IMAGE_SIZE)
        return self.net(x * 2 - 1).flatten(1)


def feature_extractor(kind: str, model: str | None = None, device: str = "auto", batch_size: int = 64):
    if kind not in EXTRACTORS:
        raise ErasekitError(f"unknown feature extractor {kind!r}; available: {', '.join(EXTRACTORS)}")
    if kind == "toy":
        if model:
            raise ErasekitError("the toy feature extractor is the embedded world's detector: it takes no model")
        from erasekit.detectors.hf_models import resolve_device

        return ToyExtractor(resolve_device(device) if device != "auto" else "cpu")
    return HFExtractor(kind, model, device, batch_size)

"""The embedded world's concept detector: a small CNN with one head per attribute (shape, colour, texture).

It plays the part NudeNet or a ResNet-50 plays for real Stable Diffusion outputs. It is trained on rendered
images and on their VAE reconstructions (blurred, slightly off in colour) so that it judges generated images
as fairly as renders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from erasekit.toy.world import COLORS, SHAPE_LABELS, TEXTURES

LABELS: dict[str, tuple[str, ...]] = {"shape": SHAPE_LABELS, "color": COLORS, "texture": TEXTURES}
DETECTOR_FILE = "detector.safetensors"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class ToyDetector(nn.Module):
    """Input: float images in [0, 1], shape (N, 3, H, W); output: logits per attribute."""

    def __init__(self, width: int = 24):
        super().__init__()
        self.features = nn.Sequential(
            _block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width), _block(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(4 * width, len(v)) for k, v in LABELS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x * 2 - 1)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.inference_mode()
    def predict(self, images, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Per-attribute probabilities (N, n_labels) for uint8 (N, H, W, 3) arrays, PIL images or float tensors."""
        x = to_tensor(images)
        device = next(self.parameters()).device
        outs: dict[str, list[torch.Tensor]] = {k: [] for k in LABELS}
        for i in range(0, len(x), batch_size):
            logits = self(x[i : i + batch_size].to(device))
            for k, v in logits.items():
                outs[k].append(v.softmax(-1).float().cpu())
        return {k: torch.cat(v) if v else torch.empty(0, len(LABELS[k])) for k, v in outs.items()}


def to_tensor(images) -> torch.Tensor:
    """uint8 (N, H, W, 3) array / list of PIL images or arrays / float (N, 3, H, W) tensor -> float (N, 3, H, W)."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if isinstance(images, np.ndarray) and images.ndim == 4:
        arr = images
    else:
        arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]) if len(images) else np.zeros((0, 1, 1, 3), np.uint8)
    if arr.dtype != np.uint8:
        raise TypeError("detector input arrays must be uint8 RGB (N, H, W, 3)")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0


def load_toy_detector(weights_dir: Path | None = None, device=None) -> ToyDetector:
    """The trained detector shipped with the package (float32, eval mode)."""
    from erasekit.toy.pipeline import WEIGHTS_DIR, _load_into

    det = ToyDetector()
    _load_into(det, Path(weights_dir or WEIGHTS_DIR) / DETECTOR_FILE)
    det.eval()
    return det.to(device) if device is not None else det


def top_labels(probs: dict[str, torch.Tensor]) -> list[dict[str, str]]:
    """The most probable label per attribute for every image."""
    idx = {k: v.argmax(-1).tolist() for k, v in probs.items()}
    n = len(next(iter(idx.values()))) if idx else 0
    return [{k: LABELS[k][idx[k][i]] for k in LABELS} for i in range(n)]

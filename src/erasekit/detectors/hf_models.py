"""Judges' transformers models: found on disk only, read from safetensors only, fingerprinted, kept once per process.

The rule is the pipelines' (`erasekit.models.loading`): a model is a local folder or a hub id already in the hub
cache (``local_files_only=True``: nothing is downloaded), and its weights are safetensors (``use_safetensors=True``):
a folder holding only pickled weights (.bin, .pt, ...) is refused before transformers sees it, as unpickling can
run code. Every problem is one `ErasekitError` line naming the folder. The images' preprocessing (resize of the
shortest edge, centre crop, normalisation, from the folder's ``preprocessor_config.json``) runs in torch on the
judge's device, so a batch of images is scored there without a trip through PIL.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from erasekit.errors import ErasekitError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Processors whose bare-int ``size`` means the shortest edge (openai/clip-*, microsoft/resnet-*, BiT/DINOv2 configs).
SHORTEST_EDGE_PROCESSORS = ("CLIP", "ConvNext", "Bit")

_LOADED: dict[tuple, tuple] = {}  # (folder, class, device, dtype) -> (model, fingerprint): one load per process


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1


def model_folder(spec: str | None, what: str, env: str | None = None) -> Path:
    """The local folder of a judge's model: ``spec`` (a folder or a hub id in the hub cache), else ``$env``."""
    spec = str(spec or "").strip() or (os.environ.get(env, "").strip() if env else "")
    if not spec:
        hint = f" or set {env}" if env else ""
        raise ErasekitError(f"{what}: no model given; set model=FOLDER (a transformers model folder or a hub id in "
                            f"the hub cache){hint}")
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_path(spec):
            raise ErasekitError(f"{what}: model {spec}: no such folder")
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(spec, local_files_only=True))
        except Exception as exc:
            raise ErasekitError(f"{what}: model {spec!r} is neither a folder nor in the hub cache (erasekit does not "
                                f"download judges: `hf download {spec}` first); cause: {_first_line(exc)}") from None
    check_model_folder(path, what)
    return path


def check_model_folder(path: Path, what: str) -> None:
    if not path.is_dir():
        raise ErasekitError(f"{what}: model {path} is not a folder")
    if not (path / "config.json").is_file():
        raise ErasekitError(f"{what}: {path} is not a transformers model folder (no config.json)")
    files = [p for p in path.iterdir() if p.is_file()]
    if not any(p.suffix == ".safetensors" for p in files):
        pickles = sorted(p.name for p in files if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ErasekitError(f"{what}: {path} has pickled weights only ({', '.join(pickles)}); erasekit loads "
                                f"safetensors only, as unpickling can run code: convert them to safetensors")
        raise ErasekitError(f"{what}: {path} holds no weights (expected *.safetensors)")


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ErasekitError(f"{path / 'config.json'}: unreadable ({type(exc).__name__})") from None


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def module_fingerprint(module) -> str:
    """sha256 (16 hex) of a module's class, config and weights: the judge's identity in every result row."""
    from erasekit.models.fingerprint import _update_module

    h = hashlib.sha256()
    _update_module(h, module)
    return h.hexdigest()[:16]


def load_model(cls, path: Path, what: str, device: str, dtype: str = "float32"):
    """(model in eval mode on ``device``, fingerprint), loaded once per process per (folder, class, device, dtype)."""
    key = (str(path.resolve()), cls.__name__, device, dtype)
    if key not in _LOADED:
        try:
            model = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        except Exception as exc:  # transformers raises OSError/ValueError/KeyError... with long messages
            raise ErasekitError(f"{what}: cannot load {cls.__name__} from {path}: {_first_line(exc)}") from None
        fp = module_fingerprint(model)  # of the weights as stored (before a dtype cast)
        model = model.eval().requires_grad_(False).to(device=device, dtype=torch_dtype(dtype))
        _LOADED[key] = (model, fp)
    return _LOADED[key]


def load_tokenizer(path: Path, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ErasekitError(f"{what}: no usable tokenizer in {path}: {_first_line(exc)}") from None


class Preprocess:
    """A transformers image processor's resize / centre crop / normalise, in torch on the judge's device.

    Read from ``preprocessor_config.json`` (CLIP, BiT/DINOv2 and ConvNeXt/ResNet processors: ``shortest_edge``,
    ``crop_pct``, ``crop_size``, ``image_mean``/``image_std``); without one: a square resize to the model's
    ``image_size`` with ``mean``/``std``. Resizing is bicubic with antialiasing (the processors use PIL's bicubic);
    an image already at the target size is not resampled, so it matches the processor exactly.
    """

    def __init__(self, path: Path, image_size: int, mean=CLIP_MEAN, std=CLIP_STD):
        cfg = {}
        if (path / "preprocessor_config.json").is_file():
            try:
                cfg = json.loads((path / "preprocessor_config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                cfg = {}
        size = cfg.get("size", image_size) if cfg.get("do_resize", True) else None
        kind = str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "")
        if isinstance(size, int) and any(k in kind for k in SHORTEST_EDGE_PROCESSORS):
            size = {"shortest_edge": size}  # these processors read a bare int as the shortest edge (get_size_dict)
        self.shortest = self.square = None
        if isinstance(size, dict) and "shortest_edge" in size:
            edge = int(size["shortest_edge"])
            crop_pct = cfg.get("crop_pct")
            if crop_pct and edge < 384:  # ConvNeXt's rule: resize to edge / crop_pct, then crop edge x edge
                self.shortest, crop = int(edge / crop_pct), (edge, edge)
            else:
                self.shortest = edge
                crop = None
        elif isinstance(size, dict) and "height" in size:
            self.square = (int(size["height"]), int(size["width"]))
            crop = None
        elif isinstance(size, int):
            self.square = (size, size)
            crop = None
        else:
            crop = None
        if cfg.get("do_center_crop", crop is not None or "crop_size" in cfg):
            c = cfg.get("crop_size")
            if isinstance(c, dict):
                crop = (int(c["height"]), int(c["width"]))
            elif isinstance(c, int):
                crop = (c, c)
            else:
                crop = crop or (image_size, image_size)
        else:
            crop = None
        self.crop = crop
        self.mean = tuple(cfg.get("image_mean", mean))
        self.std = tuple(cfg.get("image_std", std))
        self.rescale = float(cfg.get("rescale_factor", 1 / 255))

    def describe(self) -> dict:
        return {"shortest_edge": self.shortest, "resize": self.square, "crop": self.crop, "mean": self.mean,
                "std": self.std}

    def __call__(self, images: np.ndarray, device, dtype):
        """uint8 (N, H, W, 3) -> normalised float (N, 3, h, w) on ``device``."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
        h, w = x.shape[-2:]
        if self.shortest is not None and min(h, w) != self.shortest:
            s = self.shortest
            size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
        elif self.square is not None and (h, w) != self.square:
            x = F.interpolate(x, size=self.square, mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = x.shape[-2:]
            top, left = max((h - ch) // 2, 0), max((w - cw) // 2, 0)
            x = x[..., top : top + ch, left : left + cw]
        x = x * self.rescale
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(dtype)


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def split_list(text: str | None) -> list[str]:
    """A ';'-separated setting as a list of its non-empty items."""
    return [t.strip() for t in str(text or "").split(";") if t.strip()]


def as_features(out):
    """A tensor from ``get_image_features`` / ``get_text_features`` (transformers 5 returns a model output whose
    ``pooler_output`` holds the projected embedding; transformers 4 returned the tensor)."""
    return out if hasattr(out, "norm") else out.pooler_output


def make_settings(cls, overrides: dict):
    """``cls.Settings`` from Python values or ``--set``-style strings, validated (unknown keys name the judge)."""
    return cls.Settings().replace({k: v for k, v in overrides.items() if v is not None})


def check_judge_settings(settings) -> None:
    """The checks every transformers judge's settings share: a probability threshold and a batch size."""
    from erasekit.checks import finite, integer

    finite("setting threshold", settings.threshold, low=0.0, high=1.0, high_open=True)
    integer("setting batch_size", settings.batch_size, low=1, high=4096)

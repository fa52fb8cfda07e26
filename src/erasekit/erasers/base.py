"""Base types: a weight edit (computed once, applied to / reverted from a pipeline, saved as a small delta) and
an inference-time defence (installed around sampling). Both follow one protocol, so they compose.

On disk an edit is a folder:

    edit.json           method, kind, resolved settings, concept spec, base-model fingerprint, versions, timings
    edit.safetensors    the new values of the tensors the edit changed, and nothing else (weight edits only)

Tensor names are component-qualified (``unet.down_blocks.1.attentions.0...attn2.to_k.weight``), so a later
edit of the text encoder fits the same format. Only safetensors is ever read: no pickles.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from erasekit import __version__
from erasekit.errors import ErasekitError

EDIT_JSON = "edit.json"
EDIT_TENSORS = "edit.safetensors"
BAKED_EDIT_JSON = "erasekit_edit.json"  # provenance written next to a baked pipeline
FORMAT_VERSION = 1
COMPONENTS = ("unet", "text_encoder", "vae")

DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def _parameter(pipe, name: str) -> torch.nn.Parameter:
    component, _, rest = name.partition(".")
    module = getattr(pipe, component, None) if component in COMPONENTS else None
    if module is None:
        raise ErasekitError(f"edit tensor {name}: the pipeline has no component {component!r}")
    try:
        return module.get_parameter(rest)
    except AttributeError:
        raise ErasekitError(f"edit tensor {name} does not exist in this pipeline's {component}") from None


class Edit(ABC):
    """What every erasure (weight edit, defence, or a stack of them) offers: ``method`` (its name), ``kind``
    ("weight_edit", "defence", "stack"), apply / revert / save."""

    @abstractmethod
    def apply(self, pipe, verify: bool = True):
        """Make ``pipe`` use the edit; returns the pipeline to sample from (``pipe`` itself for weight edits)."""

    @abstractmethod
    def revert(self, pipe) -> None:
        """Undo `apply` on ``pipe``."""

    @abstractmethod
    def save(self, out_dir) -> Path:
        """Write the edit to ``out_dir`` (created); `load_edit` reads it back."""

@dataclass
class WeightEdit(Edit):
    """New values for a few tensors of a pipeline, plus everything needed to reproduce and audit them."""

    method: str
    tensors: dict[str, torch.Tensor]
    settings: dict[str, Any]
    spec: dict[str, Any]  # ConceptSpec.as_dict()
    base_fingerprint: str
    base_dtype: str = "torch.float32"
    timings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific records (e.g. RECE epoch selection)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    kind: str = "weight_edit"

    def __post_init__(self):
        self.tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        self._originals: dict[int, dict[str, torch.Tensor]] = {}  # id(pipe) -> tensors before apply
        if not self.versions:
            self.versions = _versions()
        if not self.created:
            self.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    # -- applying ---------------------------------------------------------------------------------
    def check_base(self, pipe) -> None:
        """`ErasekitError` unless ``pipe`` is the model the edit was computed from (same fingerprint)."""
        from erasekit.models import fingerprint

        fp = fingerprint(pipe)
        if fp != self.base_fingerprint:
            dtype = str(pipe.unet.dtype)
            hint = (f"; the edit was made on {self.base_dtype} weights and this pipeline is {dtype}: load it in "
                    f"{self.base_dtype.replace('torch.', '')}" if dtype != self.base_dtype else
                    "; apply it to the model it was made for")
            raise ErasekitError(
                f"this {self.method} edit was made for a model with fingerprint {self.base_fingerprint}, "
                f"but the pipeline's fingerprint is {fp}{hint}"
            )

    def apply(self, pipe, verify: bool = True):
        if id(pipe) in self._originals:
            raise ErasekitError(f"this {self.method} edit is already applied to this pipeline")
        params = {name: _parameter(pipe, name) for name in self.tensors}
        for name, p in params.items():
            if tuple(p.shape) != tuple(self.tensors[name].shape):
                raise ErasekitError(f"edit tensor {name} has shape {tuple(self.tensors[name].shape)}, "
                                    f"the pipeline's has {tuple(p.shape)}: the edit is for another model")
        if verify:
            self.check_base(pipe)
        originals = {}
        with torch.no_grad():
            for name, p in params.items():
                originals[name] = p.detach().to("cpu", copy=True)
                p.copy_(self.tensors[name].to(device=p.device, dtype=p.dtype))
        self._originals[id(pipe)] = originals
        return pipe

    def revert(self, pipe) -> None:
        originals = self._originals.pop(id(pipe), None)
        if originals is None:
            raise ErasekitError(f"this {self.method} edit is not applied to this pipeline")
        with torch.no_grad():
            for name, value in originals.items():
                p = _parameter(pipe, name)
                p.copy_(value.to(device=p.device, dtype=p.dtype))

    def is_applied(self, pipe) -> bool:
        return id(pipe) in self._originals

    # -- files ------------------------------------------------------------------------------------
    def n_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def record(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "method": self.method,
            "concept": self.spec,
            "settings": self.settings,
            "base_fingerprint": self.base_fingerprint,
            "base_dtype": self.base_dtype,
            "tensors": {k: list(v.shape) for k, v in sorted(self.tensors.items())},
            "tensor_bytes": self.n_bytes(),
            "timings": self.timings,
            "extra": self.extra,
            "versions": self.versions,
            "created": self.created,
        }

    def save(self, out_dir) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(dict(sorted(self.tensors.items())), str(out / EDIT_TENSORS),
                  metadata={"method": self.method, "base_fingerprint": self.base_fingerprint})
        (out / EDIT_JSON).write_text(json.dumps(self.record(), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, folder: Path, record: dict) -> "WeightEdit":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = folder / EDIT_TENSORS
        if not path.is_file():
            raise ErasekitError(f"{folder} has no {EDIT_TENSORS}")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ErasekitError(f"corrupt {path}: {exc}") from exc
        expected = record.get("tensors", {})
        if set(expected) != set(tensors) or any(list(tensors[k].shape) != v for k, v in expected.items()):
            raise ErasekitError(f"{path} does not hold the tensors {folder / EDIT_JSON} lists")
        try:
            return cls(
                method=record["method"], tensors=tensors, settings=record.get("settings", {}),
                spec=record.get("concept", {}), base_fingerprint=record["base_fingerprint"],
                base_dtype=record.get("base_dtype", "torch.float32"), timings=record.get("timings", {}),
                extra=record.get("extra", {}), versions=record.get("versions", {}), created=record.get("created", ""),
            )
        except KeyError as exc:
            raise ErasekitError(f"{folder / EDIT_JSON} lacks the field {exc}") from None

    @property
    def torch_base_dtype(self) -> torch.dtype:
        return DTYPES.get(self.base_dtype, torch.float32)


class Defence(Edit):
    """An inference-time defence (negative prompt, SLD, IRECE, ...): changes how a pipeline samples, not its
    weights. ``apply`` returns the pipeline to sample from (a wrapper or ``pipe`` with hooks installed);
    ``revert`` removes them. Subclasses register with `erasekit.erasers.registry` like weight-edit methods and
    implement ``save``/``load`` (a folder with ``edit.json``, kind "defence"). None is implemented yet."""

    kind = "defence"

    @classmethod
    @abstractmethod
    def load(cls, folder: Path, record: dict) -> "Defence":
        """Rebuild a saved defence."""


@dataclass
class Stack(Edit):
    """Edits applied in order (a weight edit, then defences on top: "RECE + IRECE"); reverted in reverse."""

    parts: list[Edit]
    kind: str = "stack"

    @property
    def method(self) -> str:  # type: ignore[override]
        return "+".join(p.method for p in self.parts)

    def apply(self, pipe, verify: bool = True):
        for part in self.parts:
            out = part.apply(pipe, verify=verify)
            pipe = pipe if out is None else out
        return pipe

    def revert(self, pipe) -> None:
        for part in reversed(self.parts):
            part.revert(pipe)

    def save(self, out_dir) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        names = []
        for i, part in enumerate(self.parts):
            name = f"{i:02d}-{part.method}"
            part.save(out / name)
            names.append(name)
        (out / EDIT_JSON).write_text(json.dumps({"format": FORMAT_VERSION, "kind": self.kind, "method": self.method,
                                                 "parts": names}, indent=2) + "\n")
        return out


def load_edit(folder, pipe=None) -> Edit:
    """Read an edit saved by ``save`` (safetensors and JSON only). With ``pipe``, also check right away that the
    edit was made for that model (weight edits record the base model's fingerprint)."""
    folder = Path(folder)
    meta = folder / EDIT_JSON
    if not folder.is_dir():
        raise ErasekitError(f"{folder}: no such folder")
    if not meta.is_file():
        raise ErasekitError(f"{folder} is not a saved edit (no {EDIT_JSON})")
    try:
        record = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ErasekitError(f"corrupt {meta}: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
        raise ErasekitError(f"{meta}: unknown edit format {record.get('format') if isinstance(record, dict) else '?'} "
                            f"(this erasekit reads format {FORMAT_VERSION})")
    kind = record.get("kind")
    if kind == "weight_edit":
        edit: Edit = WeightEdit.load(folder, record)
    elif kind == "stack":
        edit = Stack([load_edit(folder / name) for name in record.get("parts", [])])
    elif kind == "defence":
        from erasekit.erasers.registry import get

        cls = get(record.get("method", ""))
        edit = cls.load(folder, record)
    else:
        raise ErasekitError(f"{meta}: unknown edit kind {kind!r}")
    if pipe is not None and isinstance(edit, WeightEdit):
        edit.check_base(pipe)
    return edit


def bake(edit: WeightEdit, pipe, out_dir) -> Path:
    """Write ``pipe`` with ``edit`` applied as a full diffusers ``save_pretrained`` folder (safetensors), with the
    edit's record beside it; ``pipe`` is left as it was."""
    out = Path(out_dir)
    applied_here = not edit.is_applied(pipe)
    if applied_here:
        edit.apply(pipe)
    try:
        pipe.save_pretrained(str(out), safe_serialization=True)
    finally:
        if applied_here:
            edit.revert(pipe)
    (out / BAKED_EDIT_JSON).write_text(json.dumps(edit.record(), indent=2) + "\n")
    return out


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"erasekit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def changed_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``after`` that differ from ``before`` (so a delta never carries untouched tensors)."""
    return {k: v for k, v in after.items() if not torch.equal(before[k].to(v.device, v.dtype), v)}


def names_of(component: str, names: Sequence[str]) -> list[str]:
    return [f"{component}.{n}" for n in names]

"""A weight edit: computed once, applied to / reverted from a pipeline, saved as a small delta. (Inference-time
defences are `erasekit.defences`; a `erasekit.diffusion.Target` composes both.)

On disk an edit is a folder:

    edit.json           method, kind, resolved settings, concept spec, base-model fingerprint, versions, timings
    edit.safetensors    the new values of the tensors the edit changed, and nothing else (weight edits only)

Tensor names are component-qualified (``unet.down_blocks.1.attentions.0...attn2.to_k.weight``), so a later
edit of the text encoder fits the same format. Only safetensors is ever read: no pickles.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from erasekit.errors import ErasekitError

EDIT_JSON = "edit.json"
EDIT_TENSORS = "edit.safetensors"
BAKED_EDIT_JSON = "erasekit_edit.json"  # provenance written next to a baked pipeline
FORMAT_VERSION = 1

DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def _parameter(pipe, name: str) -> torch.nn.Parameter:
    from erasekit.diffusion.family import family_of

    component, _, rest = name.partition(".")
    editable = family_of(pipe).editable_components(pipe)
    module = getattr(pipe, component, None) if component in editable else None
    if module is None:
        raise ErasekitError(f"edit tensor {name}: the pipeline has no component {component!r}")
    try:
        return module.get_parameter(rest)
    except AttributeError:
        raise ErasekitError(f"edit tensor {name} does not exist in this pipeline's {component}") from None


@dataclass
class WeightEdit:
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
            from erasekit.provenance import versions

            self.versions = versions()
        if not self.created:
            self.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    # -- applying ---------------------------------------------------------------------------------
    def check_base(self, pipe) -> None:
        """`ErasekitError` unless ``pipe`` is the model the edit was computed from (same fingerprint)."""
        from erasekit.models import fingerprint

        fp = fingerprint(pipe)
        if fp != self.base_fingerprint:
            from erasekit.diffusion.family import family_of

            dtype = str(family_of(pipe).denoiser(pipe).dtype)
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

    def digest(self) -> str:
        """A content hash of the edit (method, settings, concept, base model, tensors): part of every cache key."""
        if getattr(self, "_digest", None) is None:
            import hashlib

            h = hashlib.sha256(json.dumps([self.method, self.settings, self.spec, self.base_fingerprint],
                                          sort_keys=True, default=str).encode())
            for name in sorted(self.tensors):
                t = self.tensors[name]
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            self._digest = h.hexdigest()[:16]
        return self._digest

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
        from erasekit.atomic import atomic_save_safetensors, atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Each file whole or absent; edit.json (which load_edit reads first) last.
        atomic_save_safetensors(dict(sorted(self.tensors.items())), out / EDIT_TENSORS,
                                metadata={"method": self.method, "base_fingerprint": self.base_fingerprint})
        atomic_write_text(out / EDIT_JSON, json.dumps(self.record(), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, folder: Path, record: dict) -> "WeightEdit":
        from erasekit.safe_load import load_safetensors

        path = folder / EDIT_TENSORS
        if not path.is_file():
            raise ErasekitError(f"{folder} has no {EDIT_TENSORS}")
        tensors = load_safetensors(path, "edit tensors")
        from erasekit.validity import check_finite_tensors

        check_finite_tensors(tensors, f"edit {path}", "the edit is broken (it would make blank images); refusing it")
        expected = record.get("tensors", {})
        if not isinstance(expected, dict) or set(expected) != set(tensors) or any(
                list(tensors[k].shape) != v for k, v in expected.items()):
            raise ErasekitError(f"{path} does not hold the tensors {folder / EDIT_JSON} lists")
        for name in ("method", "base_fingerprint"):
            if not isinstance(record.get(name, ""), str):
                raise ErasekitError(f"{folder / EDIT_JSON}: {name} must be text")
        for name in ("settings", "concept", "timings", "extra", "versions"):
            if not isinstance(record.get(name, {}), dict):
                raise ErasekitError(f"{folder / EDIT_JSON}: {name} must be a JSON object")
        if not isinstance(record.get("base_dtype", ""), str) or not isinstance(record.get("created", ""), str):
            raise ErasekitError(f"{folder / EDIT_JSON}: base_dtype and created must be text")
        if record.get("base_dtype", "torch.float32") not in DTYPES:  # torch.int8 would be silently read as float32
            from erasekit.limits import shown

            raise ErasekitError(f"{folder / EDIT_JSON}: base_dtype {shown(record['base_dtype'])!r} is not one of "
                                f"{', '.join(DTYPES)}")
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


def load_edit(folder, pipe=None) -> WeightEdit:
    """Read an edit saved by ``save`` (safetensors and JSON only). With ``pipe``, also check right away that the
    edit was made for that model (it records the base model's fingerprint)."""
    folder = Path(folder)
    meta = folder / EDIT_JSON
    if not folder.is_dir():
        raise ErasekitError(f"{folder}: no such folder")
    if not meta.is_file():
        raise ErasekitError(f"{folder} is not a saved edit (no {EDIT_JSON})")
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        text = str(exc).strip()
        raise ErasekitError(f"corrupt {meta}: {text.splitlines()[0] if text else type(exc).__name__}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
        raise ErasekitError(f"{meta}: unknown edit format {record.get('format') if isinstance(record, dict) else '?'} "
                            f"(this erasekit reads format {FORMAT_VERSION})")
    if record.get("kind") != "weight_edit":
        raise ErasekitError(f"{meta}: unknown edit kind {record.get('kind')!r}")
    edit = WeightEdit.load(folder, record)
    if pipe is not None:
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
    from erasekit.atomic import atomic_write_text

    atomic_write_text(out / BAKED_EDIT_JSON, json.dumps(edit.record(), indent=2) + "\n")
    return out

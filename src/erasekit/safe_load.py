"""Read tensors from safetensors files only: never through pickle (which can run arbitrary code).

`load_safetensors` reads erasekit's own tensor files (edits, learned embeddings, cached states and latents, the
embedded world's weights, Q16's prompts); model folders are read by diffusers / transformers with safetensors
required (`erasekit.models.loading`, unless ``--allow-pickle``; `erasekit.detectors.hf_models`). Every way a file
can be unusable (missing, not a file, not safetensors, a pickle under a .safetensors name, truncated, a corrupt
header) becomes one `ErasekitError` line that names the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from erasekit.errors import ErasekitError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER = 100_000_000  # as safetensors itself


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def declared_size(path) -> int:
    """The file size the safetensors header promises (8-byte length + header + the end of the last tensor);
    ValueError when the header is unreadable."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER:
            raise ValueError(f"header length {n} is implausible")
        raw = f.read(n)
    if len(raw) < n:
        raise ValueError("truncated header")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    ends = []
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if not isinstance(v, dict) or not isinstance(v.get("data_offsets"), list) or len(v["data_offsets"]) != 2:
            raise ValueError(f"bad header entry {k!r}")
        ends.append(int(v["data_offsets"][1]))
    return 8 + n + max(ends, default=0)


def _kind_of(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return ""
    if head.startswith(b"PK\x03\x04"):
        return " (it is a zip archive: a torch.save pickle, which erasekit does not load)"
    if head.startswith(b"\x80"):
        return " (it looks like a pickle, which erasekit does not load)"
    return ""


def load_safetensors(path, what: str = "tensor file") -> dict:
    """All tensors of the safetensors file ``path`` (on the CPU), or an `ErasekitError` naming ``what`` and
    the file: missing, unreadable, a pickle, truncated or corrupt."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ErasekitError(f"missing {what} {path}")
    if not path.is_file():
        raise ErasekitError(f"{what} {path} is not a file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ErasekitError(f"{what} {path} is a pickle file ({path.suffix}); erasekit reads only .safetensors "
                            f"(convert it, e.g. with safetensors.torch.save_file)")
    try:
        size = path.stat().st_size
        promised = declared_size(path)
    except OSError as exc:
        raise ErasekitError(f"cannot read {what} {path}: {exc.strerror or _first_line(exc)}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ErasekitError(f"corrupt {what} {path}: not a safetensors file{_kind_of(path)} "
                            f"({_first_line(exc)})") from None
    if size < promised:
        raise ErasekitError(f"corrupt {what} {path}: truncated ({size} of {promised} bytes)")
    try:
        return load_file(str(path))
    except MemoryError:
        raise ErasekitError(f"corrupt {what} {path}: tensors too large to load") from None
    except Exception as exc:  # SafetensorError, OSError, ValueError, RuntimeError, ...: all mean "unusable file"
        raise ErasekitError(f"corrupt {what} {path}: {_first_line(exc)}") from None

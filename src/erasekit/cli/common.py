"""What every command shares: one-line errors, loading a `Target`, ``--set`` parsing, option help texts (torch
set-up, devices and dtypes come from `erasekit.runtime`, which the benchmark uses too).

Mistakes a user can fix (bad arguments, unusable model folders, missing files) end with one line,
``error: <message>``, on stderr and exit status 2; set ERASEKIT_DEBUG=1 to see the traceback instead. Heavy
imports (torch, diffusers) happen inside the commands, so ``erasekit --help`` stays fast.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Sequence

import typer

from erasekit.errors import ErasekitError
from erasekit.runtime import DEVICE_HELP, DTYPE_NAMES, resolve_device, resolve_dtype, setup_torch  # noqa: F401

EXIT_USER_ERROR = 2
MAX_MESSAGE_CHARS = 1_000  # an error line is cut here: a message never carries a whole huge value

DTYPE_HELP = "auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16."
FAST_HELP = ("GPU speed: channels-last and a compiled UNet and VAE decoder (compiled once per shape; images within "
             "a few levels of the eager path's, recorded and cached apart from them).")
MODEL_HELP = "'toy', a diffusers pipeline folder, or a hub id in the local cache."
PRECISION_HELP = ("default, or fp8: --fast with FP8 matrix products in the UNet's linear layers and 1x1 convolutions "
                  "(CUDA GPUs of compute capability 8.9+: Ada, Hopper; images change a little: recorded and cached "
                  "apart); fp8-conv (experimental): its 3x3 convolutions too; fp8-torchao: the linear layers through "
                  "torchao's float8 recipe (pip install 'erasekit[fp8]').")
PICKLE_HELP = "Also load pickled (.bin) weights where a folder has no safetensors: only for folders you trust."


def print_error(message: str) -> None:
    """``error: <message>`` on one line of stderr: whitespace collapsed, control characters escaped, long cut."""
    # Plain print, not rich: rich would wrap a long message over several lines.
    text = " ".join(str(message).split())
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    print("error: " + text, file=sys.stderr)


def fail(message: str) -> None:
    print_error(message)
    raise typer.Exit(EXIT_USER_ERROR)


def one_line_errors(command):
    """Turn user-fixable errors raised inside ``command`` into one line on stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ErasekitError, FileNotFoundError, ValueError) as exc:
            if os.environ.get("ERASEKIT_DEBUG"):
                raise
            fail(str(exc) or type(exc).__name__)
        except OSError as exc:  # a full disk anywhere (a folder made, a plot saved): one line, and it resumes
            from erasekit.atomic import DiskFullError, is_disk_full

            if os.environ.get("ERASEKIT_DEBUG") or not is_disk_full(exc):
                raise
            fail(str(DiskFullError(exc.filename)))

    return wrapper


def quiet_libraries() -> None:
    # transformers/diffusers warn on every load of the toy pipeline (BERT instead of CLIP, no torchvision).
    if not os.environ.get("ERASEKIT_DEBUG"):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def check_path_names(where: str, path: Path) -> None:
    """Each name in ``path`` fits the file system (255 bytes on most): a 300-character name fails here, not as
    an OSError after the model is loaded."""
    from erasekit.limits import MAX_PATH_NAME, shown

    for part in Path(path).parts:
        if len(os.fsencode(part)) > MAX_PATH_NAME:
            raise ErasekitError(f"{where} {shown(part)!r}: a name of {len(os.fsencode(part))} bytes; file systems "
                                f"allow {MAX_PATH_NAME}")


def check_out_dir(out: Path) -> None:
    check_path_names("--out", out)
    if out.exists() and not out.is_dir():
        raise ErasekitError(f"--out {out} exists and is not a folder")


def parse_sets(pairs: Sequence[str] | None) -> dict[str, str]:
    from erasekit.settings import parse_set_options

    return parse_set_options(pairs or [])


def read_edit(edit_dir: Path | None):
    """The saved edit in ``edit_dir`` (read before the model is loaded, to fail fast)."""
    if edit_dir is None:
        return None
    if not edit_dir.is_dir():
        raise ErasekitError(f"--edit {edit_dir}: no such folder")
    from erasekit.erasers import load_edit

    return load_edit(edit_dir)


def read_defences(specs: Sequence[str] | None, concept: str | None = None) -> list:
    """The ``--defence`` specs; a defence that needs a concept takes ``concept`` (the command's ``--concept``)."""
    from erasekit.defences import parse_defence

    return [parse_defence(s, concept) for s in specs or []]


def check_defence_concepts(defences: Sequence, world) -> None:
    """Each defence's concept must be one ``world`` knows (``irece:concept=unicorn`` on the toy world is refused)."""
    for d in defences:
        concept = getattr(d.settings, "concept", None)
        if isinstance(concept, str) and concept.strip():
            try:
                world.check_concept(concept)
            except ErasekitError as exc:
                raise ErasekitError(f"--defence {d.name}: concept {concept.strip()!r}: {exc}") from None


def load_target(model: str, *, edit=None, defences: Sequence = (), device: str = "auto", dtype: str = "auto",
                allow_pickle: bool = False):
    """Load ``model`` as a `Target` with ``edit`` (a loaded `WeightEdit`) and ``defences``.

    A weight edit is checked against the weights it was made from (their dtype included): the model is loaded in
    the edit's dtype, fingerprinted, then cast to the dtype asked for.
    """
    setup_torch()
    from erasekit.diffusion import Target
    from erasekit.models import fingerprint, load_pipeline

    device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, device)
    load_dtype = edit.torch_base_dtype if edit is not None else target_dtype
    pipe = load_pipeline(model, device=device, dtype=load_dtype, allow_pickle=allow_pickle)
    base_fp = fingerprint(pipe)
    if load_dtype != target_dtype:
        pipe.to(dtype=target_dtype)
    from erasekit.worlds import world_of

    target = Target(pipe, model=model, world=world_of(pipe), base_fingerprint=base_fp)
    check_defence_concepts(defences, target.world)  # before any image is made
    if edit is not None:
        target = target.with_edits(edit)
        target._check(edit)
    return target.with_defences(*defences)


def fast_mode(fast: bool, precision: str, device: str):
    """The ``fast`` value of ``--fast`` and ``--precision`` (False, True or "fp8": fp8 implies fast), refused
    before any model is loaded when fp8 asks for a GPU that ``--device`` is not."""
    from erasekit.diffusion.fp8 import check_fp8_device, parse_precision

    precision = parse_precision(precision)
    if precision == "default":
        return bool(fast)
    check_fp8_device(resolve_device(device))
    return precision


def out_folder(value) -> Path:
    """``--out``'s parser: an empty value (``--out ''``, which Path would read as the current folder, where a run
    would then write and replace files) is refused; ``--out .`` still means the current folder, on purpose."""
    if isinstance(value, Path):
        return value
    if not str(value).strip():
        raise typer.BadParameter("empty: it would mean the current folder; give a folder name (--out . on purpose)")
    return Path(value)

"""The `erasekit` command line: generate | detect | ls | toy.

Mistakes a user can fix (bad arguments, unusable model folders, missing files) end with one line,
``error: <message>``, on stderr and exit status 2; set ERASEKIT_DEBUG=1 to see the traceback instead.
Heavy imports (torch, diffusers) happen inside the commands, so ``erasekit --help`` stays fast.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from erasekit import __version__
from erasekit.errors import ErasekitError

app = typer.Typer(
    help="Concept erasure for text-to-image diffusion models, and the attacks that measure it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals hold tensors and whole pipelines
)
toy_app = typer.Typer(help="The embedded toy world: train its models, evaluate them.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")

EXIT_USER_ERROR = 2
REGISTRY_KINDS = ("erasers", "attacks", "detectors")
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")


def _fail(message: str) -> None:
    # Plain print, not rich: rich would wrap a long message over several lines.
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
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
            _fail(str(exc) or type(exc).__name__)

    return wrapper


def _quiet_libraries() -> None:
    # transformers/diffusers warn on every load of the toy pipeline (BERT instead of CLIP, no torchvision).
    if not os.environ.get("ERASEKIT_DEBUG"):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _setup_torch() -> None:
    import torch

    if not os.environ.get("ERASEKIT_DEBUG"):
        # Per-component "Loading weights" bars of transformers / diffusers; our own progress bar remains.
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()

    # Random-init and trained weights produce denormal floats; flushing them is 10-18% faster on CPU.
    torch.set_flush_denormal(True)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def _version_callback(value: bool) -> None:
    if value:
        print(f"erasekit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Show the version."),
) -> None:
    _quiet_libraries()


def dir_digest(folder: Path) -> str:
    """A hash of every file under ``folder`` (names and bytes): identifies an edit on disk."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _load_edit(edit_dir: Path):
    """The saved edit in ``edit_dir`` (checked before the model is loaded, to fail fast)."""
    if not edit_dir.is_dir():
        raise ErasekitError(f"--edit {edit_dir}: no such folder")
    try:
        from erasekit.erasers import load_edit
    except ImportError as exc:
        raise ErasekitError(f"--edit needs erasekit.erasers.load_edit, which this install lacks ({exc})") from exc
    return load_edit(edit_dir)


@app.command()
@one_line_errors
def generate(
    prompts: Optional[List[str]] = typer.Argument(None, help="One or more prompts.", show_default=False),
    model: str = typer.Option("toy", "--model", "-m", help="'toy', a diffusers pipeline folder, or a hub id in the local cache."),
    n: int = typer.Option(8, "-n", "--n", help="Images per prompt; prompt k's images use seeds SEED .. SEED+n-1."),
    seed: int = typer.Option(0, "--seed", help="First seed (the same seeds are used for every prompt)."),
    out: Path = typer.Option(Path("out/generate"), "--out", "-o", help="Output folder (PNGs, images.jsonl, grid.png)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="DDIM steps (default: 20 for toy, 25 otherwise)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale (default: 5 for toy, 7.5 otherwise)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt for every image."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass (does not change the images)."),
    edit: Optional[Path] = typer.Option(None, "--edit", help="Apply a saved erasure edit (folder) before generating."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16."),
) -> None:
    """Generate images; rerunning with the same arguments reuses the images already in --out."""
    prompts = list(prompts or [])
    if not prompts:
        raise ErasekitError("give at least one prompt")
    if n < 1:
        raise ErasekitError(f"-n must be at least 1, got {n}")
    if batch_size < 1:
        raise ErasekitError(f"--batch-size must be at least 1, got {batch_size}")
    if steps is not None and steps < 1:
        raise ErasekitError(f"--steps must be at least 1, got {steps}")
    if out.exists() and not out.is_dir():
        raise ErasekitError(f"--out {out} exists and is not a folder")
    if dtype not in DTYPE_NAMES:
        raise ErasekitError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
    saved_edit = _load_edit(edit) if edit is not None else None
    _setup_torch()
    from erasekit.generation import generate_to_dir
    from erasekit.models import load_pipeline

    device = _resolve_device(device)
    target_dtype = _resolve_dtype(dtype, device)
    # A weight edit is checked against the weights it was made from (their dtype included), then cast.
    load_dtype = getattr(saved_edit, "torch_base_dtype", None) or target_dtype
    pipe = load_pipeline(model, device=device, dtype=load_dtype)
    edit_id = None
    if saved_edit is not None:
        edited = saved_edit.apply(pipe)
        pipe = pipe if edited is None else edited  # edits may work in place or return a new pipeline
        if load_dtype != target_dtype:
            pipe.to(dtype=target_dtype)
        # Part of the cache key: inference-time defences leave the weights (and so the fingerprint) unchanged.
        edit_id = f"{edit.name}@{dir_digest(edit)}"
    all_prompts = [p for p in prompts for _ in range(n)]
    all_seeds = [seed + i for _ in prompts for i in range(n)]
    records, generated = generate_to_dir(
        pipe, all_prompts, all_seeds, out,
        steps=steps, guidance=guidance, batch_size=batch_size, negative_prompt=negative_prompt,
        model=model, edit=edit_id,
    )
    reused = len(records) - generated
    print(
        f"{len(records)} images in {out} ({generated} generated, {reused} reused); "
        f"index {out / 'images.jsonl'}, grid {out / 'grid.png'}",
        file=sys.stderr,
    )


def _read_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise ErasekitError(f"{path}: no such file")
    if not path.is_file():
        raise ErasekitError(f"{path} is not a file")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ErasekitError(f"{path} is not a readable image ({exc.__class__.__name__})") from exc


@app.command()
@one_line_errors
def detect(
    images: Optional[List[Path]] = typer.Argument(None, help="Image files to score.", show_default=False),
    detector: str = typer.Option("toy", "--detector", help="Which detector (only 'toy' for now)."),
    batch_size: int = typer.Option(256, "--batch-size"),
) -> None:
    """Score images with a concept detector: one JSON line per image on stdout."""
    images = list(images or [])
    if not images:
        raise ErasekitError("give at least one image file")
    if detector != "toy":
        raise ErasekitError(f"unknown detector {detector!r}; available: toy")
    pil_images = [_read_image(p) for p in images]  # check every file before loading the model
    _setup_torch()
    import numpy as np
    from PIL import Image

    from erasekit.toy.architecture import IMAGE_SIZE
    from erasekit.toy.detector import LABELS, load_toy_detector

    det = load_toy_detector()
    # The detector is trained at the world's image size; other sizes are resized to it (area-averaged).
    arrays = np.stack([
        np.asarray(im if im.size == (IMAGE_SIZE, IMAGE_SIZE) else im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))
        for im in pil_images
    ])
    probs = det.predict(arrays, batch_size=batch_size)
    for i, path in enumerate(images):
        row = {"path": str(path)}
        for attribute, labels in LABELS.items():
            row[attribute] = {label: round(float(p), 4) for label, p in zip(labels, probs[attribute][i].tolist())}
        print(json.dumps(row))


def _registry_names(kind: str) -> list[str] | None:
    """Names registered under ``erasekit.<kind>``, or None when that package has no registry (yet)."""
    import importlib

    try:
        module = importlib.import_module(f"erasekit.{kind}")
    except ImportError:
        return None
    for attr in ("available", "names", "list_names"):
        fn = getattr(module, attr, None)
        if callable(fn):
            return sorted(fn())
    for attr in ("REGISTRY", "registry"):
        reg = getattr(module, attr, None)
        if reg is not None:
            return sorted(reg.names() if hasattr(reg, "names") else reg)
    return None


@app.command("ls")
@one_line_errors
def list_registries() -> None:
    """List the registered erasers, attacks and detectors."""
    for kind in REGISTRY_KINDS:
        names = _registry_names(kind)
        if names is None:
            print(f"{kind}: (no registry in this install)")
        else:
            print(f"{kind}: {', '.join(names) if names else '(none registered)'}")
            described = _registry_descriptions(kind)
            width = max(map(len, described), default=0)
            for name, line in described.items():
                print(f"  {name:<{width}}  {line}")


def _registry_descriptions(kind: str) -> dict[str, str]:
    """Name -> one-line description, for registries that offer ``list_methods()``."""
    import importlib

    try:
        describe = getattr(importlib.import_module(f"erasekit.{kind}"), "list_methods", None)
    except ImportError:
        return {}
    return dict(describe()) if callable(describe) else {}


from erasekit.cli_erase import erase_command  # noqa: E402  (its heavy imports happen inside the command)

app.command("erase")(one_line_errors(erase_command))

from erasekit.cli_attack import attack_command  # noqa: E402  (its heavy imports happen inside the command)

app.command("attack")(one_line_errors(attack_command))


# The toy commands hand every argument to the training / evaluation scripts' own parsers (argparse), so
# their options live in one place; `erasekit toy train --help` shows them.
def _toy_script(name: str):
    import importlib

    _setup_torch()
    try:
        return importlib.import_module(f"erasekit.toy.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"erasekit.toy.{name}":
            raise
        raise ErasekitError(f"erasekit.toy.{name} is not part of this install") from exc


# `toy train` hands every argument to the training script's own parser (argparse), so its many options
# live in one place; `erasekit toy train --help` shows them.
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@toy_app.command("train", context_settings=PASS_THROUGH)
@one_line_errors
def toy_train(ctx: typer.Context) -> None:
    """Train the toy world's VAE, detector and UNet (python -m erasekit.toy.train; options: --help)."""
    train = _toy_script("train")
    sys.argv[0] = "erasekit toy train"  # argparse's usage line
    train.main(list(ctx.args))


@toy_app.command("eval")
@one_line_errors
def toy_eval(
    n_prompts: Optional[int] = typer.Option(None, "--n-prompts", help="Prompt-following samples (default: the script's)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the figures as JSON here."),
) -> None:
    """Evaluate the toy model with its detector: accuracy, prompt following, paraphrases, speed."""
    if n_prompts is not None and n_prompts < 1:
        raise ErasekitError(f"--n-prompts must be at least 1, got {n_prompts}")
    options = {"n_prompts": n_prompts, "out": out}
    _toy_script("evaluate").main(**{k: v for k, v in options.items() if v is not None})


if __name__ == "__main__":
    app()

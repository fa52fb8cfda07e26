"""`erasekit erase`: compute a weight edit and save it (registered in `erasekit.cli`).

    erasekit erase --method uce --concept star --model toy --out out/uce-star
    erasekit generate "a star" --edit out/uce-star

Everything that can be checked without the model (method name, ``--set`` keys and types, the output folder)
is checked before the model is loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from erasekit.errors import ErasekitError

PIPELINE_SUBDIR = "pipeline"


def erase_command(
    method: str = typer.Option(..., "--method", help="Erasure method (see `erasekit ls`): uce, rece, esd-x, esd-u."),
    concept: List[str] = typer.Option(..., "--concept", help="Concept to erase (repeat for several)."),
    model: str = typer.Option("toy", "--model", "-m", help="'toy', a diffusers pipeline folder, or a hub id in the local cache."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the edit (edit.json + edit.safetensors)."),
    guide: Optional[str] = typer.Option(None, "--guide", help="Concept to map the erased one to (default: \"\" on SD; "
                                        "the empty scene / plain background on the toy)."),
    preserve: Optional[List[str]] = typer.Option(None, "--preserve", help="Concept to keep intact (repeat for several)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Method setting key=value (repeat); see the method's module."),
    save_pipeline: bool = typer.Option(False, "--save-pipeline", help=f"Also write the edited model as a full diffusers folder (OUT/{PIPELINE_SUBDIR})."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Erase a concept from a model; writes a small delta that `generate --edit` applies."""
    from erasekit.cli import _resolve_device, _setup_torch
    from erasekit.erasers import get, parse_set_options
    from erasekit.erasers.base import EDIT_JSON

    method_cls = get(method)
    overrides = parse_set_options(set_ or [])
    method_cls.Settings.parse(overrides)
    if out.exists() and not out.is_dir():
        raise ErasekitError(f"--out {out} exists and is not a folder")
    if (out / EDIT_JSON).exists():
        raise ErasekitError(f"--out {out} already holds an edit; choose another folder or remove it")
    if not concept or not all(c.strip() for c in concept):
        raise ErasekitError("--concept is empty: the concept encodes to nothing; give a word or phrase")

    _setup_torch()
    import torch

    from erasekit.erasers import bake, erase
    from erasekit.models import load_pipeline

    device = _resolve_device(device)
    # Erase in float32 always: the closed-form solves run in float64 anyway, ESD trains in float32.
    pipe = load_pipeline(model, device=device, dtype=torch.float32)
    edit = erase(pipe, method, concept, guide=guide, preserve=preserve or [], settings=overrides, progress=not quiet)
    edit.save(out)
    if save_pipeline:
        bake(edit, pipe, out / PIPELINE_SUBDIR)
    t = edit.timings
    print(
        f"{method}: erased {', '.join(map(repr, concept))} -> guide {edit.spec['guide']!r}; "
        f"{len(edit.tensors)} tensors ({edit.n_bytes() / 2**20:.2f} MiB) in {out}; "
        f"solve {t['solve_s']:.3f} s, wall {t['wall_s']:.2f} s, peak RSS {t['peak_rss_mb']:.0f} MB"
        + (f", CUDA peak {t['cuda_peak_mb']:.0f} MB" if t.get("cuda_peak_mb") else "")
        + (f"; full pipeline in {out / PIPELINE_SUBDIR}" if save_pipeline else ""),
        file=sys.stderr,
    )

"""`erasekit erase`: compute a weight edit and save it.

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

from erasekit.cli import common
from erasekit.errors import ErasekitError

PIPELINE_SUBDIR = "pipeline"


def check_names(concepts, preserve, guide) -> None:
    """Texts a user typed: printable, and the guide not one of the concepts (that maps a concept to itself)."""
    from erasekit.limits import shown

    for where, texts in (("--concept", concepts), ("--preserve", preserve), ("--guide", [guide] if guide else [])):
        for text in texts:
            if not text.isprintable():
                raise ErasekitError(f"{where} {shown(text)!r} holds control characters")
    if guide is not None and guide.strip() in {c.strip() for c in concepts}:
        raise ErasekitError(f"--guide {shown(guide)!r} is the concept to erase: it would map the concept to itself; "
                            f"give a neutral concept or leave --guide out for the world's")


def erase(
    method: str = typer.Option(..., "--method", help="Erasure method (see `erasekit ls`): uce, rece, esd-x, esd-u."),
    concept: Optional[List[str]] = typer.Option(None, "--concept", help="Concept to erase (repeat for several: uce, "
                                                "rece, speed, mace erase them in one edit)."),
    concepts_file: Optional[Path] = typer.Option(None, "--concepts-file", metavar="FILE",
                                                 help="Concepts to erase, one a line (blank lines and # comments "
                                                 "skipped; repeats erased once, with a warning); adds to --concept."),
    model: str = typer.Option("toy", "--model", "-m", help=common.MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", parser=common.out_folder, metavar="DIR", help="Folder for the edit (edit.json + edit.safetensors)."),
    guide: Optional[str] = typer.Option(None, "--guide", help="Concept to map the erased one to (default: its world's: "
                                        "\"\" on SD, the empty scene / plain background on the toy)."),
    preserve: Optional[List[str]] = typer.Option(None, "--preserve", help="Concept to keep intact (repeat for several); "
                                                 "default: the set the world's tuned settings assume, as the bench's "
                                                 "(toy: the other shapes / textures for uce, rece, esd-u)."),
    no_preserve: bool = typer.Option(False, "--no-preserve", help="Keep nothing intact on purpose (overrides the default set)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Method setting key=value (repeat); see the method's module."),
    save_pipeline: bool = typer.Option(False, "--save-pipeline", help=f"Also write the edited model as a full diffusers folder (OUT/{PIPELINE_SUBDIR})."),
    device: str = typer.Option("auto", "--device", help=common.DEVICE_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=common.PICKLE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Erase a concept from a model; writes a small delta that `generate --edit` applies."""
    from erasekit.erasers.base import EDIT_JSON
    from erasekit.registry import ERASERS

    method_cls = ERASERS.get(method)
    overrides = common.parse_sets(set_)
    method_cls.Settings.parse(overrides)
    common.check_out_dir(out)
    if (out / EDIT_JSON).exists():
        raise ErasekitError(f"--out {out} already holds an edit; choose another folder or remove it")
    if concept and not all(c.strip() for c in concept):
        raise ErasekitError("--concept is empty: the concept encodes to nothing; give a word or phrase")
    from erasekit.erasers.concept_list import check_method_takes, concept_list

    concept = concept_list(concept or [], concepts_file, warn=lambda m: print(m, file=sys.stderr))
    check_method_takes(method_cls, concept)
    if no_preserve and preserve:
        raise ErasekitError("--no-preserve and --preserve contradict each other; give one")
    check_names(concept, preserve or [], guide)

    from erasekit.folder_lock import hold_folder

    with hold_folder(out):
        # Erase in float32 always: the closed-form solves run in float64 anyway, ESD trains in float32.
        target = common.load_target(model, device=device, dtype="float32", allow_pickle=allow_pickle)
        from erasekit.erasers import bake
        from erasekit.erasers import erase as compute_edit

        from erasekit.erasers.method import default_preserve

        # Not given: the preservation set the world's tuned settings for this method assume (the bench's default).
        kept = [] if no_preserve else (list(preserve) if preserve else default_preserve(target.pipe, method, concept))
        edit = compute_edit(target.pipe, method, concept, guide=guide, preserve=kept, settings=overrides,
                            progress=not quiet)
        edit.save(out)
        if save_pipeline:
            bake(edit, target.pipe, out / PIPELINE_SUBDIR)
    t = edit.timings
    print(
        f"{method}: erased {_listed(concept)} -> guide {edit.spec['guide']!r}"
        f"{'; kept ' + _listed(edit.spec['preserve'], quote=False) if edit.spec['preserve'] else '; nothing preserved'}; "
        f"{len(edit.tensors)} tensors ({edit.n_bytes() / 2**20:.2f} MiB) in {out}; "
        f"solve {t['solve_s']:.3f} s, wall {t['wall_s']:.2f} s, peak RSS {t['peak_rss_mb']:.0f} MB"
        + (f", CUDA peak {t['cuda_peak_mb']:.0f} MB" if t.get("cuda_peak_mb") else "")
        + (f"; full pipeline in {out / PIPELINE_SUBDIR}" if save_pipeline else ""),
        file=sys.stderr,
    )


def _listed(texts, quote: bool = True, first: int = 6) -> str:
    """The texts, joined; a long list (mass erasure) as its count and first few."""
    items = [repr(t) if quote else t for t in texts]
    if len(items) <= first:
        return ", ".join(items)
    return f"{len(items)} concepts ({', '.join(items[:first])}, ...)"

"""`erasekit toy train|eval`: the embedded world's training and evaluation scripts.

``toy train`` hands every argument to the training script's own parser (argparse), so its many options live in one
place; ``erasekit toy train --help`` shows them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from erasekit.cli import common
from erasekit.errors import ErasekitError

toy_app = typer.Typer(help="The embedded toy world: train its models, evaluate them.", no_args_is_help=True)
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _toy_script(name: str):
    import importlib

    common.setup_torch()
    try:
        return importlib.import_module(f"erasekit.toy.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"erasekit.toy.{name}":
            raise
        raise ErasekitError(f"erasekit.toy.{name} is not part of this install") from exc


def check_writable(out: Path) -> None:
    """``out`` (a file to write) can be written: not a folder, its folder creatable and writable."""
    import os
    import tempfile

    common.check_path_names("--out", out)
    if out.is_dir():
        raise ErasekitError(f"--out {out} is a folder; give a file name (e.g. {out / 'toy-eval.json'})")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=".erasekit-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ErasekitError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or type(exc).__name__})") from None


@toy_app.command("train", context_settings=PASS_THROUGH)
@common.one_line_errors
def toy_train(ctx: typer.Context) -> None:
    """Train the toy world's VAE, detector and UNet (python -m erasekit.toy.train; options: --help)."""
    train = _toy_script("train")
    sys.argv[0] = "erasekit toy train"  # argparse's usage line
    train.main(list(ctx.args))


@toy_app.command("eval")
@common.one_line_errors
def toy_eval(
    n_prompts: Optional[int] = typer.Option(None, "--n-prompts", help="Prompt-following samples (default: the script's)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the figures as JSON here."),
) -> None:
    """Evaluate the toy model with its detector: accuracy, prompt following, paraphrases, speed."""
    if n_prompts is not None and n_prompts < 1:
        raise ErasekitError(f"--n-prompts must be at least 1, got {n_prompts}")
    if n_prompts is not None:
        from erasekit.checks import integer
        from erasekit.limits import MAX_IMAGES

        integer("--n-prompts", n_prompts, high=MAX_IMAGES)
    if out is not None:
        check_writable(out)  # minutes of evaluation must not end in a PermissionError
    options = {"n_prompts": n_prompts, "out": out}
    _toy_script("evaluate").main(**{k: v for k, v in options.items() if v is not None})

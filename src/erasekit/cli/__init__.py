"""The `erasekit` command line: one module per command, helpers in `erasekit.cli.common`."""

from __future__ import annotations

import typer

from erasekit import __version__
from erasekit.cli import attack, bench, common, detect, erase, generate, ls, report, toy

app = typer.Typer(
    help="Concept erasure for text-to-image diffusion models, and the attacks that measure it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals hold tensors and whole pipelines
)


def _version_callback(value: bool) -> None:
    if value:
        print(f"erasekit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Show the version."),
) -> None:
    common.quiet_libraries()


app.command("generate")(common.one_line_errors(generate.generate))
app.command("detect")(common.one_line_errors(detect.detect))
app.command("erase")(common.one_line_errors(erase.erase))
app.command("attack")(common.one_line_errors(attack.attack))
app.command("ls")(common.one_line_errors(ls.list_registries))
app.command("bench")(common.one_line_errors(bench.bench))
app.command("report")(common.one_line_errors(report.report))
app.add_typer(toy.toy_app, name="toy")

__all__ = ["app"]

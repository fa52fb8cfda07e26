"""The `erasekit` command line: one module per command, helpers in `erasekit.cli.common`."""

from __future__ import annotations

import sys
from typing import Optional

import click
import typer
from typer.core import TyperGroup

from erasekit import __version__
from erasekit.cli import attack, bench, common, detect, erase, generate, ls, report, toy

# typer >= 0.22 vendors click (typer._click): its exceptions are not click's own classes.
_CLICKS = tuple(dict.fromkeys([click, getattr(typer.core, "_click", click)]))
_CLICK_ERRORS = tuple(m.exceptions.ClickException for m in _CLICKS)
_NO_ARGS_HELP = tuple(m.exceptions.NoArgsIsHelpError for m in _CLICKS)
_ABORTS = tuple(dict.fromkeys([click.Abort, typer.Abort]))


class OneLineGroup(TyperGroup):
    """Click's usage errors (``-n abc``, a missing option, an unknown command) as one ``error:`` line, exit 2,
    like every other bad input; help (``--help``, no arguments) as usual."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        for i, arg in enumerate(args):
            if isinstance(arg, str) and any("\udc80" <= ch <= "\udcff" for ch in arg):
                # Bytes that are not UTF-8 (Python keeps them as lone surrogates): no prompt or name can hold them.
                shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                common.print_error(f"argument {i + 1} ({shown[:60]!r}) is not valid UTF-8 text")
                if not standalone_mode:
                    raise click.UsageError("an argument is not valid UTF-8 text")
                sys.exit(common.EXIT_USER_ERROR)
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except _NO_ARGS_HELP as exc:
            if not standalone_mode:
                raise
            exc.show()
            sys.exit(exc.exit_code)
        except _CLICK_ERRORS as exc:
            if not standalone_mode:
                raise
            common.print_error(exc.format_message())
            sys.exit(common.EXIT_USER_ERROR)
        except _ABORTS:
            if not standalone_mode:
                raise
            print("Aborted!", file=sys.stderr)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=OneLineGroup,
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
@common.one_line_errors
def main(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Show the version."),
    threads: Optional[str] = typer.Option(None, "--threads", help="torch's CPU threads: N or auto (default: "
                                          "$ERASEKIT_THREADS, else $OMP_NUM_THREADS, else auto: the cores this process "
                                          "may use less those other work keeps busy; recorded in every cost)."),
) -> None:
    from erasekit.threads import request

    common.quiet_libraries()
    request(threads)


app.command("generate")(common.one_line_errors(generate.generate))
app.command("detect")(common.one_line_errors(detect.detect))
app.command("erase")(common.one_line_errors(erase.erase))
app.command("attack")(common.one_line_errors(attack.attack))
app.command("ls")(common.one_line_errors(ls.list_registries))
app.command("bench")(common.one_line_errors(bench.bench))
app.command("report")(common.one_line_errors(report.report))
app.add_typer(toy.toy_app, name="toy")

__all__ = ["app"]

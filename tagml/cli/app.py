"""The Typer app, its global options, and `main`: where an error becomes one line and an exit code.

The commands register themselves on `app` in their modules (imported by the package).
"""

import os
import sys
from collections.abc import Sequence
from typing import Annotated

import typer

from tagml import __version__
from tagml.cli.errors import CommandFailed, ExitCode, exit_code_for, one_line
from tagml.core.runtime import configure_process

app = typer.Typer(
    name="tagml",
    help="Customer tag models: features, training, scoring, monitoring. Exit codes: 0 ok, 1 unexpected, 2 bad argument, "
    "3 not found, 4 configuration, 5 store unavailable, 6 drift found, 7 a Dagster run failed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_state: dict[str, bool] = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"tagml {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show the traceback of an error")] = False,
) -> None:
    """Customer tag models: features, training, scoring, monitoring."""
    _state["debug"] = debug


def _silence_stdout() -> None:
    """After a closed pipe, later writes (and Python's flush at exit) must not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (errors are one line on stderr, never a traceback)."""
    configure_process()
    import warnings

    # an unknown TAGML_* variable: one line, once, not Python's two-line warning format
    warnings.showwarning = lambda message, category, *_a, **_k: print(f"tagml: warning: {message}", file=sys.stderr)
    command = typer.main.get_command(app)
    try:
        result = command.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="tagml", standalone_mode=False)
        sys.stdout.flush()
        return int(result) if isinstance(result, int) else ExitCode.OK
    except typer.Exit as done:
        return done.exit_code
    except SystemExit as stop:
        # click answers a closed stdout (EPIPE) itself with sys.exit(1) after pacifying the stream
        if type(sys.stdout).__name__ == "PacifyFlushWrapper":
            _silence_stdout()
            return ExitCode.BROKEN_PIPE
        return stop.code if isinstance(stop.code, int) else ExitCode.UNEXPECTED
    except typer.Abort:
        print("tagml: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except typer.TyperException as usage:  # bad arguments and options: Typer's message, code 2
        show = getattr(usage, "show", None)
        if show is not None:
            show(file=sys.stderr)
        else:
            print(f"tagml: error: {usage}", file=sys.stderr)
        return usage.exit_code
    except BrokenPipeError:
        _silence_stdout()
        return ExitCode.BROKEN_PIPE
    except KeyboardInterrupt:
        print("tagml: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place errors become messages and exit codes
        code = exit_code_for(exc)
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        if isinstance(exc, CommandFailed):
            print(f"tagml: {exc}", file=sys.stderr)
        elif code == ExitCode.UNEXPECTED:
            print(f"tagml: unexpected error: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
        else:
            print(f"tagml: error: {one_line(exc)}", file=sys.stderr)
        return code

"""The ``calib`` command line: parse, call the library, print a summary.

Command groups live in sibling modules, each with ``register(app)``.
Exit codes: 0 ok, 1 target not met, 2 bad input (``CalibError``: one line, no traceback).
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer

from calib.cli._common import set_quiet
from calib.errors import CalibError, TargetNotMet

__all__ = ["app", "main"]

app = typer.Typer(
    name="calib",
    help="INT8 calibration workbench: collect statistics, calibrate, export Q/DQ ONNX and TensorRT caches, "
    "compare FP32 vs INT8 layer by layer, and fix what INT8 breaks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_MODULES = ["core", "export", "compare", "data", "pipeline", "dashboard", "trt_tools"]


@app.callback()
def _root(quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors and final paths."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    set_quiet(quiet)
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # ORT's own warnings (e.g. "Removing initializer") are noise here


for _name in _MODULES:
    try:
        _mod = importlib.import_module(f"calib.cli.{_name}")
    except ModuleNotFoundError as e:  # a command group not built yet
        if e.name != f"calib.cli.{_name}":
            raise
        continue
    _mod.register(app)


def _sigterm(signum, frame):  # a terminated run is recorded as interrupted, like Ctrl-C
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in-process; returns the exit code instead of exiting."""
    try:
        app(args=argv, standalone_mode=False, prog_name="calib")
    except TargetNotMet as e:
        print(f"calib: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    except CalibError as e:
        print(f"calib: error: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return 2
        if isinstance(e, click.exceptions.Abort):
            return 130
        raise
    except KeyboardInterrupt:
        print("calib: interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    import signal

    signal.signal(signal.SIGTERM, _sigterm)
    sys.exit(main())

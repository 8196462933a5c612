"""The ``calib`` command line: parse, call the library, print a summary.

Command groups live in sibling modules, each with ``register(app)``.
Exit codes: 0 ok, 1 target not met, 2 bad input (``CalibError``) or bad usage (unknown option or command, missing
or malformed value): one line, no traceback; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
Every command runs with its input files protected: no output may overwrite one (``calib.io.protect_inputs``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import signal
import sys

import typer

from calib import __version__
from calib._memory import steady_malloc
from calib.cli._common import command_inputs, command_outputs, set_quiet
from calib.errors import CalibError, TargetNotMet
from calib.io import check_output, protect_inputs

__all__ = ["app", "main", "entry"]

app = typer.Typer(
    name="calib",
    help="INT8 calibration workbench: collect statistics, calibrate, export Q/DQ ONNX and TensorRT caches, "
    "compare FP32 vs INT8 layer by layer, and fix what INT8 breaks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_MODULES = ["core", "export", "compare", "data", "pipeline", "dashboard", "trt_tools"]
_state = {"signal": 0}


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("calib")
        except PackageNotFoundError:  # run from a source tree that was never installed
            installed = __version__
        print(f"calib {installed}")
        raise typer.Exit(0)


@app.callback()
def _root(quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors and final paths."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
          _version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                        help="Print calib's version and exit.")) -> None:
    set_quiet(quiet)
    steady_malloc()  # the CLI's choice for its own process: flat peak RSS over many batches (calib._memory)
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # ORT's own warnings (e.g. "Removing initializer") are noise here


def _guarded(name: str, fn):
    """``fn`` run with the files it reads protected from every writer (same signature, so typer parses it)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        params = dict(sig.bind_partial(*args, **kwargs).arguments)
        with protect_inputs(command_inputs(name, params)):
            for out in command_outputs(name, params):
                check_output(out)  # before any work
            return fn(*args, **kwargs)

    return wrapper


for _name in _MODULES:
    try:
        _mod = importlib.import_module(f"calib.cli.{_name}")
    except ModuleNotFoundError as e:  # a command group not built yet
        if e.name != f"calib.cli.{_name}":
            raise
        continue
    _mod.register(app)
for _cmd in app.registered_commands:
    _cmd.callback = _guarded(_cmd.name or _cmd.callback.__name__, _cmd.callback)


def _usage_error(e: BaseException) -> bool:
    """A parse error of typer (>= 0.29 vendors click as ``typer._click``) or of click (older typer)."""
    return (isinstance(e, getattr(typer, "TyperException", ())) or type(e).__module__.split(".")[0] == "click") \
        and hasattr(e, "format_message")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _report(e: CalibError, prefix: str) -> None:
    print(f"{prefix}{_one_line(e)}", file=sys.stderr)
    if e.hint:
        print(f"hint: {_one_line(e.hint)}", file=sys.stderr)


def _interrupted() -> int:
    code = 128 + (_state["signal"] or signal.SIGINT)
    print("calib: terminated" if code == 143 else "calib: interrupted", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in-process; returns the exit code instead of exiting."""
    _state["signal"] = 0
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="calib")
    except TargetNotMet as e:
        _report(e, "calib: ")
        return 1
    except CalibError as e:
        _report(e, "calib: error: ")
        return 2
    except typer.Exit as e:
        return _interrupted() if e.exit_code == 130 else e.exit_code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as e:
        if _usage_error(e) and type(e).__name__ == "NoArgsIsHelpError":  # bare 'calib' (or a group): help
            print(e.format_message())
            return 0
        if _usage_error(e):
            print(f"calib: usage: {_one_line(e.format_message())} (see 'calib --help')", file=sys.stderr)
            return 2
        if type(e).__name__ == "Abort":  # typer/click's abort (e.g. EOF at a prompt)
            return _interrupted()
        raise
    if isinstance(rv, int) and not isinstance(rv, bool):
        return _interrupted() if rv == 130 else rv  # typer turns KeyboardInterrupt into Exit(130)
    return 0


def _on_signal(signum, frame):  # a terminated run is recorded as interrupted, like Ctrl-C
    _state["signal"] = signum
    raise KeyboardInterrupt


def entry() -> None:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    sys.exit(main())

"""Options and helpers shared by every command module of the CLI."""

from __future__ import annotations

from typing import Callable

from calib.cli.progress import StageProgress

__all__ = ["Progress", "is_quiet", "set_quiet", "echo"]

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"]


def echo(msg: str = "") -> None:
    if not _state["quiet"]:
        print(msg)


class Progress(StageProgress):
    """A ``progress(stage, done, total)`` callable: stage headers and one bar per stage on a terminal, a line per
    stage and per 10 % otherwise (``calib.cli.progress``); with --quiet it draws nothing."""

    def __init__(self) -> None:
        super().__init__(quiet=_state["quiet"])


ProgressFn = Callable[[str, int, "int | None"], None]

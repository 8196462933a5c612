"""Options and helpers shared by every command module of the CLI."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from tqdm import tqdm

__all__ = ["Progress", "is_quiet", "set_quiet", "echo"]

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"]


def echo(msg: str = "") -> None:
    if not _state["quiet"]:
        print(msg)


class Progress:
    """A ``progress(stage, done, total)`` callable drawn with tqdm (one bar per stage).

    On a non-terminal stderr it logs a plain line every 10 %; with --quiet it draws nothing.
    """

    def __init__(self) -> None:
        self._bars: dict[str, tqdm] = {}
        self._last: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if _state["quiet"]:
            return
        if not sys.stderr.isatty():
            pct = int(100 * done / total) // 10 if total else done
            if self._last.get(stage) != pct or (total and done >= total):
                self._last[stage] = pct
                if total is None or done in (0, total) or pct != 0:
                    logging.getLogger("calib").info("%s: %d/%s", stage, done, total if total else "?")
            return
        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, desc=stage, unit="it", leave=False, dynamic_ncols=True)
        if total is not None and bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()
        if total is not None and done >= total:
            bar.close()
            del self._bars[stage]

    def close(self) -> None:
        for b in self._bars.values():
            b.close()
        self._bars.clear()


ProgressFn = Callable[[str, int, "int | None"], None]

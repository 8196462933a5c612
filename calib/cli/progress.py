"""Progress people can read: a header per stage, one bar per stage, quiet logs when not a terminal.

The library reports ``progress(stage, done, total)``. Stages that are steps of one search
(``advise step 3 candidates``, ``advise step 3: candidate 2 of 5``, ``advise step 4``) belong to
one *family* (``advise``): they share one bar whose description says where the search is
("step 3: candidate 2 of 5") instead of a new 0/N block per candidate.

On a terminal: a header line when a family starts, then one tqdm bar for it. Not on a terminal
(CI, a log file): one line when a family starts, one per 10 % of a plain stage, and one per step
of a stepped family (never one per candidate).
"""

from __future__ import annotations

import re
import sys
import time
from typing import TextIO

from tqdm import tqdm

__all__ = ["StageProgress", "split_stage"]

_STEP = re.compile(r"^(?P<family>.+?):? step (?P<step>\d+)(?P<rest>.*)$")
_CANDIDATE = re.compile(r"candidate (?P<j>\d+) of (?P<n>\d+)")


def split_stage(stage: str) -> tuple[str, str, str | None]:
    """``(family, detail, step)``: ``"advise step 3: candidate 2 of 5"`` -> ``("advise", "step 3: candidate 2 of 5",
    "3")``; ``"advise: scoring methods"`` -> ``("advise", "scoring methods", None)``; ``"collect"`` -> ``("collect",
    "", None)``."""
    m = _STEP.match(stage)
    if m:
        rest = m.group("rest").strip(" :")
        cand = _CANDIDATE.search(rest)
        what = cand.group(0) if cand else rest
        return m.group("family").strip(), f"step {m.group('step')}" + (f": {what}" if what else ""), m.group("step")
    if ": " in stage:
        family, detail = stage.split(": ", 1)
        return family.strip(), detail.strip(), None
    return stage.strip(), "", None


class StageProgress:
    """A ``progress(stage, done, total)`` callable for the CLI (see the module docstring)."""

    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.family: str | None = None
        self.detail = ""
        self.step: str | None = None
        self.bar: tqdm | None = None
        self.logged_pct = -1
        self.last_done = 0
        self.n_stages = 0
        self.t0 = time.perf_counter()

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.clear()
        print(text, file=self.stream, flush=True)
        if self.bar is not None:
            self.bar.refresh()

    def _start_family(self, family: str) -> None:
        self.close()
        self.family, self.detail, self.step, self.logged_pct = family, "", None, -1
        self.n_stages += 1
        self.t0 = time.perf_counter()
        self._line(f"[{self.n_stages}] {family}" if not self.tty else f"── [{self.n_stages}] {family} ──")

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if self.quiet:
            return
        family, detail, step = split_stage(stage)
        if family != self.family:
            self._start_family(family)
        new_detail = detail != self.detail or done < self.last_done  # a new sub-stage, or the stage again
        self.last_done = done
        if new_detail:
            self.detail, self.logged_pct = detail, -1
        if self.tty:
            self._draw(done, total, new_detail)
        else:
            self._log(done, total, step)

    def _draw(self, done: int, total: int | None, new_detail: bool) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.family, unit="sample", leave=False, dynamic_ncols=True,
                            file=self.stream)
        if new_detail or (total is not None and self.bar.total != total):
            self.bar.reset(total=total)
            self.bar.set_description(f"{self.family} {self.detail}".strip(), refresh=False)
        self.bar.n = done
        self.bar.refresh()

    def _log(self, done: int, total: int | None, step: str | None) -> None:
        if step is not None:  # a stepped family: one line per step, whatever its candidates do
            if step != self.step:
                self.step = step
                self._line(f"  {self.family} step {step}")
            return
        pct = int(100 * done / total) // 10 * 10 if total else 0
        if pct > self.logged_pct:
            self.logged_pct = pct
            what = f"{self.family} {self.detail}".strip()
            self._line(f"  {what}: {done}/{total if total else '?'} ({pct} %)" if total else f"  {what}: {done}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

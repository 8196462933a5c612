"""CLI progress: a header per stage, one bar per stage (not per advise candidate), quiet logs off a terminal."""

from __future__ import annotations

import io

from calib.cli.progress import StageProgress, split_stage


def _feed(p: StageProgress, steps: int = 3, candidates: int = 46, n: int = 200) -> None:
    for d in range(0, 101, 4):
        p("collect", d, 100)
    for s in range(1, steps + 1):
        for j in range(1, candidates + 1):
            for d in (0, n // 2, n):
                p(f"advise step {s}: candidate {j} of {candidates}", d, n)
        for d in (0, n):
            p(f"advise step {s}", d, n)
    for d in range(0, 17):
        p("compare", d, 16)
    p.close()


def test_split_stage():
    assert split_stage("advise step 3: candidate 2 of 5") == ("advise", "step 3: candidate 2 of 5", "3")
    assert split_stage("advise step 4 candidates") == ("advise", "step 4: candidates", "4")
    assert split_stage("advise step 0") == ("advise", "step 0", "0")
    assert split_stage("advise: scoring methods") == ("advise", "scoring methods", None)
    assert split_stage("collect") == ("collect", "", None)


def test_log_mode_writes_a_line_per_stage_step_and_ten_percent():
    out = io.StringIO()
    _feed(StageProgress(stream=out, tty=False))
    lines = out.getvalue().splitlines()
    assert [x for x in lines if x.startswith("[")] == ["[1] collect", "[2] advise", "[3] compare"]
    assert [x for x in lines if "advise step" in x] == ["  advise step 1", "  advise step 2", "  advise step 3"]
    collect = [x for x in lines if x.startswith("  collect")]
    assert len(collect) == 11 and collect[0].endswith("0/100 (0 %)") and collect[-1].endswith("100/100 (100 %)")
    assert len([x for x in lines if x.startswith("  compare")]) == 11  # 16 updates, 11 tenths
    assert len(lines) == 3 + 3 + 11 + 11  # not one block per candidate (3 x 46 of them)


def test_terminal_mode_draws_one_bar_per_stage_with_the_candidate_in_its_description():
    out = io.StringIO()
    _feed(StageProgress(stream=out, tty=True), steps=1, candidates=5)
    text = out.getvalue()
    assert text.count("── [2] advise ──") == 1 and text.count("── [1] collect ──") == 1
    assert "advise step 1: candidate 5 of 5" in text and "advise step 1: candidate 2 of 5" in text
    assert text.count("── [") == 3


def test_quiet_draws_nothing():
    out = io.StringIO()
    _feed(StageProgress(stream=out, tty=False, quiet=True))
    assert out.getvalue() == ""

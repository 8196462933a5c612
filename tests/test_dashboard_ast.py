"""The dashboard's job threads and Streamlit's page parsing never build AST objects at once (gh-106905)."""

from __future__ import annotations

import ast
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def test_ast_parse_and_numpy_headers_are_serialized_once_a_job_starts(tmp_path, monkeypatch):
    pytest.importorskip("streamlit", reason="the dashboard needs streamlit")
    monkeypatch.syspath_prepend(str(REPO / "apps"))
    monkeypatch.setattr(ast, "parse", ast.parse)  # restored after the test
    sys.modules.pop("state", None)
    sys.modules.pop("actions", None)
    import actions  # apps/actions.py

    actions.serialize_ast_parse()
    wrapped = ast.parse
    actions.serialize_ast_parse()
    assert ast.parse is wrapped and ast.parse.__wrapped__ is not wrapped  # once, around the original
    np.save(tmp_path / "a.npy", np.arange(3))
    # while another thread holds the lock, neither ast.parse (Streamlit's magic) nor numpy's header reader
    # (ast.literal_eval) may run; both finish once it is released
    done: list[str] = []
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with actions._AST_LOCK:
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    readers = [threading.Thread(target=lambda: done.append(type(ast.parse("x = 1")).__name__)),
               threading.Thread(target=lambda: done.append(str(np.load(tmp_path / "a.npy").sum())))]
    for r in readers:
        r.start()
    for r in readers:
        r.join(0.5)
    assert done == []  # both wait on the lock
    release.set()
    for r in readers:
        r.join(10)
    t.join(10)
    assert sorted(done) == ["3", "Module"]

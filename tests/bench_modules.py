"""Import the peers benchmark's driver modules (bench/peers, bench/peers/tools) in a test process.

bench/peers/models.py and tests/models.py share a module name: the bench modules are imported with the
bench's ``models``, then ``models`` is given back to the tests collected in the same process.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

PEERS = Path(__file__).resolve().parents[1] / "bench" / "peers"


def import_bench(*names: str) -> list:
    for p in (PEERS / "tools", PEERS):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    tests_models = sys.modules.pop("models", None)
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        sys.modules.pop("models", None)
        if tests_models is not None:
            sys.modules["models"] = tests_models

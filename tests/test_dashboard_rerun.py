"""Re-running a recorded run from the dashboard rebuilds the configuration it was made with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
state = pytest.importorskip("apps.state")


@pytest.mark.parametrize("recorded, expected", [({}, "fp32"), ({"high_precision": "fp16"}, "fp16"),
                                                ({"high_precision": "bf16"}, "bf16")])
def test_rerun_keeps_the_recorded_remainder(monkeypatch, recorded, expected):
    """A run recorded before ``high_precision`` existed had an FP32 remainder: its re-run must too, not the new
    fp16 default."""
    cfg = {"name": "old", "model": "m.onnx", "calib_data": "calib", "placement": "trt", **recorded}
    monkeypatch.setattr(state, "config_dict", lambda run: cfg)
    assert state.run_config(object()).high_precision == expected
    assert state.run_config(object(), high_precision="fp16").high_precision == "fp16"

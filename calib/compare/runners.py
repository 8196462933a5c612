"""Kept import path: the runners live in ``calib.runtime`` (plain ONNX Runtime sessions, one batch at a time).

compare used to build Polygraphy's ``OnnxrtRunner``; it only passed feeds through to an
ONNX Runtime session, so calib now opens that session itself (``calib.runtime.open_runner``,
same threads and optimisation level). The metrics keep Polygraphy's definitions
(``calib.compare.metrics``, cross-checked against Polygraphy in the tests).
"""

from calib.runtime import OPTIMIZATION_LEVELS, Runner, mark_outputs, open_runner

ModelRunner = Runner

__all__ = ["OPTIMIZATION_LEVELS", "mark_outputs", "ModelRunner", "open_runner"]

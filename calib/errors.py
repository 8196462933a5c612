"""Errors calib raises on bad input. Anything else escaping calib is a bug.

Every subclass also inherits the matching built-in so callers that catch
``ValueError`` or ``ImportError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "CalibError",
    "InputDataError",
    "ModelError",
    "CacheFormatError",
    "RangesError",
    "ConfigError",
    "RunStoreError",
    "TensorRTUnavailable",
    "TargetNotMet",
]


class CalibError(Exception):
    """Base class: a problem with the user's input, reported as one clear line.

    ``hint`` is an optional second line telling the user what to do.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class InputDataError(CalibError, ValueError):
    """Calibration or evaluation data that does not fit the model."""


class ModelError(CalibError, ValueError):
    """A model file that cannot be read, checked or handled."""


class CacheFormatError(CalibError, ValueError):
    """A TensorRT calibration cache or statistics file that does not parse."""


class RangesError(CalibError, ValueError):
    """Ranges or statistics that do not fit the model (missing or foreign tensors)."""


class ConfigError(CalibError, ValueError):
    """A configuration file or option that does not parse."""


class RunStoreError(CalibError, ValueError):
    """A run directory that is not a calib run, or a run store problem."""


class TensorRTUnavailable(CalibError, ImportError):
    """TensorRT cannot be imported here; the message says why."""


class TargetNotMet(CalibError):
    """An accuracy target could not be met (CLI exit code 1, not 2)."""

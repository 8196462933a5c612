"""Output metrics, accuracy targets, and user metric functions.

A target is ``NAME:VALUE``; the metric must reach VALUE (higher is better):

* ``cosine:0.99``  the lowest, over graph outputs, of the mean per-sample cosine
  (see ``calib.compare.metrics``)
* ``sqnr:30``      the lowest output SQNR in dB
* ``top1:0.99``    top-1 agreement between FP32 and INT8 on the first [N, C] output
* ``accuracy:0.9`` INT8 top-1 accuracy against the labels (needs labelled data)
* ``metric:0.95``  the user metric's value (``user_metric=`` / ``--metric``)

User metrics. Either a **streaming factory**: a zero-argument callable (a class,
usually) returning an object with ``update(fp32_outputs, int8_outputs, labels)``
and ``result() -> float``; calib makes a fresh one per evaluation. Or a **batch
function** ``fn(fp32_outputs, int8_outputs, labels) -> float`` that returns the
mean over the batch's samples; calib averages it over batches, weighted by
batch size. ``fp32_outputs`` and ``int8_outputs`` map graph output names to arrays
(first axis = sample); ``labels`` is an int64 array with -1 for unlabelled
samples, or None when the data has no labels. Higher must mean better. From the
CLI, ``--metric package.module:function`` names it.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from calib.compare.metrics import TaskAccumulator, TensorAccumulator
from calib.compare.paired import SampleErrors
from calib.errors import ConfigError

__all__ = ["Target", "parse_target", "TARGET_METRICS", "StreamingMetric", "UserMetric", "load_metric",
           "OutputMetrics"]

TARGET_METRICS = {
    "cosine": "lowest mean per-sample cosine over the graph outputs",
    "sqnr": "lowest output SQNR (dB)",
    "top1": "top-1 agreement FP32 vs INT8 (first [N, C] output)",
    "accuracy": "INT8 top-1 accuracy against labels",
    "metric": "the user metric (--metric module:function)",
}


class StreamingMetric(Protocol):
    def update(self, fp32_outputs: dict[str, np.ndarray], int8_outputs: dict[str, np.ndarray],
               labels: np.ndarray | None) -> None: ...

    def result(self) -> float: ...


@dataclass(frozen=True)
class Target:
    metric: str
    value: float

    def met(self, x: float) -> bool:
        return not math.isnan(x) and x >= self.value

    def __str__(self) -> str:
        return f"{self.metric}:{self.value:g}"


def parse_target(text: str | Target) -> Target:
    """``"cosine:0.99"`` -> ``Target("cosine", 0.99)``; ``ConfigError`` naming what is wrong."""
    if isinstance(text, Target):
        return text
    name, sep, val = str(text).strip().partition(":")
    known = ", ".join(f"{k}:VALUE" for k in TARGET_METRICS)
    if not sep or not name:
        raise ConfigError(f"target '{text}': expected METRIC:VALUE, e.g. cosine:0.99 (metrics: {known})")
    if name not in TARGET_METRICS:
        import difflib

        close = difflib.get_close_matches(name, list(TARGET_METRICS), n=1)
        raise ConfigError(f"target '{text}': unknown metric '{name}' (known: {', '.join(TARGET_METRICS)})",
                          hint=f"did you mean '{close[0]}:{val}'?" if close else None)
    try:
        value = float(val)
    except ValueError:
        raise ConfigError(f"target '{text}': '{val}' is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"target '{text}': the value must be finite")
    if name in ("cosine", "top1", "accuracy") and not -1.0 <= value <= 1.0:
        raise ConfigError(f"target '{text}': {name} lies in [0, 1] (cosine in [-1, 1]); got {value:g}",
                          hint="write a fraction, e.g. top1:0.99 for 99 %")
    return Target(name, value)


class _BatchFunction:
    """Adapts ``fn(fp32, int8, labels) -> float`` to the streaming protocol (batch-size weighted mean)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.total = 0.0
        self.n = 0

    def update(self, fp32_outputs, int8_outputs, labels) -> None:
        k = len(next(iter(fp32_outputs.values())))
        v = float(self.fn(fp32_outputs, int8_outputs, labels))
        self.total += v * k
        self.n += k

    def result(self) -> float:
        return self.total / self.n if self.n else math.nan

    def merge(self, other: "_BatchFunction") -> "_BatchFunction":
        out = _BatchFunction(self.fn)
        out.total, out.n = self.total + other.total, self.n + other.n
        return out


@dataclass
class UserMetric:
    """A user metric: ``name`` plus a factory of fresh streaming objects."""

    name: str
    factory: Callable[[], StreamingMetric]

    @classmethod
    def wrap(cls, obj: Any, name: str | None = None) -> "UserMetric":
        """Accept a streaming factory (zero required arguments) or a batch function (three)."""
        if isinstance(obj, UserMetric):
            return obj
        if not callable(obj):
            raise ConfigError(f"metric {obj!r} is not callable")
        label = name or getattr(obj, "__qualname__", getattr(obj, "__name__", "metric"))
        try:
            params = [p for p in inspect.signature(obj).parameters.values()
                      if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            params = []
        if len(params) == 0:
            probe = obj()
            if not (hasattr(probe, "update") and hasattr(probe, "result")):
                raise ConfigError(f"metric '{label}': calling it with no arguments must return an object with "
                                  "update(fp32_outputs, int8_outputs, labels) and result()")
            return cls(label, obj)
        if len(params) == 3:
            return cls(label, lambda: _BatchFunction(obj))
        raise ConfigError(f"metric '{label}' takes {len(params)} required arguments; expected 0 (a factory of "
                          "objects with update/result) or 3 (fp32_outputs, int8_outputs, labels)")


def load_metric(spec: str) -> UserMetric:
    """``"package.module:function"`` -> ``UserMetric`` (imports the module; never reads other files)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"metric '{spec}': expected module.path:function, e.g. mypkg.metrics:iou")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"metric '{spec}': cannot import module '{mod_name}' ({e})",
                          hint="make the module importable (pip install -e, or PYTHONPATH)") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"metric '{spec}': module '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return UserMetric.wrap(obj, name=spec)


def _labels_array(labels: Sequence[int | None] | None) -> np.ndarray | None:
    if labels is None or all(x is None for x in labels):
        return None
    return np.array([-1 if x is None else int(x) for x in labels], dtype=np.int64)


@dataclass
class OutputMetrics:
    """Everything measured at the graph outputs for one INT8 variant, streaming."""

    outputs: list[str]
    user: UserMetric | None = None
    tensors: dict[str, TensorAccumulator] = field(default_factory=dict)
    tasks: dict[str, TaskAccumulator] = field(default_factory=dict)
    samples: SampleErrors | None = None  # per-sample errors (``calib.compare.paired``), when samples have ids
    _user_state: Any = None

    def __post_init__(self) -> None:
        self.tensors = {o: TensorAccumulator() for o in self.outputs}
        self.samples = SampleErrors(list(self.outputs))
        if self.user is not None:
            self._user_state = self.user.factory()

    def update(self, fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray], ids: Sequence[str] | None,
               labels: Sequence[int | None] | None) -> None:
        for o in self.outputs:
            a, b = fp32[o], int8[o]
            s = self.tensors[o].update(a, b, ids)
            if ids is not None and a.ndim >= 1 and a.shape[0] == len(ids) and s.shape[0] == len(ids):
                self.samples.add(o, ids, s[:, 3], s[:, 1])
            if ids is not None and a.ndim == 2 and a.shape[0] == len(ids) and TaskAccumulator.applies(a.shape):
                self.tasks.setdefault(o, TaskAccumulator()).update(a, b, labels)
        if self._user_state is not None:
            self._user_state.update({o: fp32[o] for o in self.outputs}, {o: int8[o] for o in self.outputs},
                                    _labels_array(labels))

    def merge(self, other: "OutputMetrics") -> "OutputMetrics":
        """Both shards' metrics together (exact: ``calib.compare.metrics``). A user metric needs its own
        ``merge(other)`` returning the merged state."""
        out = OutputMetrics(self.outputs, self.user)
        out.tensors = {o: self.tensors[o].merge(other.tensors[o]) for o in self.outputs}
        out.samples = self.samples.merge(other.samples)
        for o in self.outputs:
            mine, theirs = self.tasks.get(o), other.tasks.get(o)
            if mine is not None or theirs is not None:
                out.tasks[o] = mine.merge(theirs) if mine is not None and theirs is not None else mine or theirs
        if self._user_state is not None:
            if not hasattr(self._user_state, "merge"):
                raise ConfigError(f"metric '{self.user.name}' has no merge(other): it cannot be evaluated in shards",
                                  hint="add merge() to the metric's class, or use the local backend")
            out._user_state = self._user_state.merge(other._user_state)
        return out

    def value(self, metric: str) -> float:
        """The value of a target metric (see ``TARGET_METRICS``)."""
        if metric == "cosine":
            return min(t.result()["cosine"] for t in self.tensors.values())
        if metric == "sqnr":
            return min(t.result()["sqnr_db"] for t in self.tensors.values())
        if metric in ("top1", "accuracy"):
            if not self.tasks:
                raise ConfigError(f"target metric '{metric}' needs a classifier output [N, C]; outputs are "
                                  f"{', '.join(f'{o} {self.tensors[o].shape}' for o in self.outputs)}",
                                  hint="use cosine:VALUE or sqnr:VALUE for other outputs")
            task = next(iter(self.tasks.values())).result()
            if metric == "top1":
                return task["top1_agreement"]
            if "accuracy_int8" not in task:
                raise ConfigError("target 'accuracy' needs labelled evaluation data",
                                  hint="give labels (a 'labels' array in the .npz, or --labels)")
            return task["accuracy_int8"]
        if metric == "metric":
            if self._user_state is None:
                raise ConfigError("target 'metric:VALUE' needs a user metric", hint="pass --metric module:function")
            return float(self._user_state.result())
        raise ConfigError(f"unknown target metric '{metric}'")

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for o in self.outputs:
            r = self.tensors[o].result()
            if o in self.tasks:
                r.update(self.tasks[o].result())
            out[o] = r
        if self._user_state is not None:
            out["_user_metric"] = {"name": self.user.name, "value": float(self._user_state.result())}
        return out

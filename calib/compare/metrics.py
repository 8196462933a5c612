"""Streaming FP32-vs-INT8 metrics: fold each batch into float64 sums, merge shards exactly.

``TensorAccumulator`` holds, for one tensor pair (a = FP32, b = INT8, e = b - a),
float64 sums over every value seen: a.b, |a|^2, |b|^2, |e|^2, sum |e|, max |e|,
and the per-sample cosines. Memory does not grow with the number of samples.

Definitions (``result()``):

* ``cosine``: the **mean over samples** of each sample's cosine similarity
  between the flattened FP32 and INT8 tensors (a sample is one index of the
  batch axis; a model without a batch axis makes each feed one sample). One bad
  sample therefore shows even when the tensor is large. Two zero vectors count
  as 1, one zero vector as 0 (Polygraphy's convention).
* ``cosine_global``: one cosine over the whole tensor across all samples
  (Polygraphy's ``CosineSimilarityCompareFunc`` over the concatenated outputs).
* ``min_cosine`` and ``worst_sample``: the lowest per-sample cosine and its id.
* ``sqnr_db``: 10 log10(sum a^2 / sum e^2) over all values (Polygraphy's SNR);
  +inf for an exact match.
* ``max_abs_error``, ``mean_abs_error``: of e over all values.
* ``relative_error``: ||e||_2 / ||a||_2 over all values.

Non-finite values (in either tensor) are counted in ``n_nonfinite`` and left
out of every sum.

Exact sums: each sample's float64 sums are added *exactly* (as integers in units of
2**-1074, the smallest float64), and rounded to float64 once, in ``result()``. So the
result does not depend on how the samples were batched, sharded or merged: a merge of
shards (``merge``, e.g. from Ray workers) equals one local pass bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from calib.compare._kernels import pair_sums

__all__ = ["TensorAccumulator", "TaskAccumulator", "per_sample_view", "safe_float", "unsafe_float"]


def per_sample_view(x: np.ndarray, n_samples: int | None) -> np.ndarray:
    """``x`` as (samples, values): split along axis 0 when it is the batch axis, else one sample."""
    if n_samples is not None and x.ndim >= 1 and x.shape[0] == n_samples:
        return x.reshape(n_samples, -1)
    return x.reshape(1, -1)


_UNIT = 1074  # exact sums count units of 2**-1074, the smallest float64


def _exact(values: np.ndarray) -> int:
    """The exact sum of finite float64 ``values`` in units of 2**-1074 (an integer: associative, commutative)."""
    total = 0
    for v in values.tolist():
        n, d = float(v).as_integer_ratio()
        total += n << (_UNIT + 1 - d.bit_length())
    return total


def _float(x: int) -> float:
    """An exact sum (``_exact``) rounded once to the nearest float64."""
    try:
        return x / (1 << _UNIT)  # int / int is correctly rounded in Python
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def _cosines(dot: np.ndarray, aa: np.ndarray, bb: np.ndarray) -> np.ndarray:
    denom = np.sqrt(aa * bb)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), np.where((aa == 0) & (bb == 0), 1.0, 0.0))
    return np.clip(c, -1.0, 1.0)


@dataclass
class TensorAccumulator:
    """Mergeable sums for one FP32/INT8 tensor pair (see the module docstring); the sums are exact integers
    in units of 2**-1074 (``_exact``)."""

    n_values: int = 0
    n_samples: int = 0
    n_nonfinite: int = 0
    dot: int = 0
    aa: int = 0
    bb: int = 0
    err2: int = 0
    abs_err: int = 0
    max_abs_err: float = 0.0
    cos_sum: int = 0
    min_cos: float = math.inf
    worst_sample: str | None = None
    shape: tuple[int, ...] | None = None

    def update(self, a: np.ndarray, b: np.ndarray, sample_ids: Sequence[str] | None = None) -> np.ndarray:
        """Fold one batch; ``sample_ids`` names the batch axis (None: the whole array is one sample). Returns
        the per-sample sums (rows: samples; columns a.b, |a|^2, |b|^2, |e|^2, sum |e|, max |e|, non-finite)."""
        if a.shape != b.shape:
            raise ValueError(f"shapes differ: FP32 {a.shape}, INT8 {b.shape}")
        if self.shape is None:
            self.shape = tuple(a.shape[1:]) if sample_ids is not None else tuple(a.shape)
        n = len(sample_ids) if sample_ids is not None else None
        a2 = per_sample_view(np.asarray(a), n)
        b2 = per_sample_view(np.asarray(b), n)
        if sample_ids is not None and a2.shape[0] == len(sample_ids):
            ids = list(sample_ids)
        else:
            ids = ["+".join(sample_ids) if sample_ids else "all"]
        s = pair_sums(a2, b2)
        dot, aa, bb, err2 = s[:, 0], s[:, 1], s[:, 2], s[:, 3]
        self.n_nonfinite += int(s[:, 6].sum())
        cos = _cosines(dot, aa, bb)
        self.n_values += a2.size
        self.n_samples += a2.shape[0]
        self.dot += _exact(dot)
        self.aa += _exact(aa)
        self.bb += _exact(bb)
        self.err2 += _exact(err2)
        self.abs_err += _exact(s[:, 4])
        if s.shape[0]:
            self.max_abs_err = max(self.max_abs_err, float(s[:, 5].max()))
        self.cos_sum += _exact(cos)
        k = int(np.argmin(cos)) if cos.size else 0
        if cos.size and float(cos[k]) < self.min_cos:
            self.min_cos = float(cos[k])
            self.worst_sample = ids[k] if k < len(ids) else None
        return s

    def merge(self, other: "TensorAccumulator") -> "TensorAccumulator":
        """A new accumulator equal to folding both shards' batches (order does not matter)."""
        out = TensorAccumulator(
            n_values=self.n_values + other.n_values, n_samples=self.n_samples + other.n_samples,
            n_nonfinite=self.n_nonfinite + other.n_nonfinite, dot=self.dot + other.dot, aa=self.aa + other.aa,
            bb=self.bb + other.bb, err2=self.err2 + other.err2, abs_err=self.abs_err + other.abs_err,
            max_abs_err=max(self.max_abs_err, other.max_abs_err), cos_sum=self.cos_sum + other.cos_sum,
            shape=self.shape or other.shape)
        lo = min((self, other), key=lambda x: x.min_cos)
        out.min_cos, out.worst_sample = lo.min_cos, lo.worst_sample
        return out

    def result(self) -> dict[str, Any]:
        n = max(self.n_values - self.n_nonfinite, 1)
        dot, aa, bb, err2 = _float(self.dot), _float(self.aa), _float(self.bb), _float(self.err2)
        if err2 == 0:
            sqnr = math.inf
        elif aa == 0:
            sqnr = -math.inf
        else:
            sqnr = 10.0 * math.log10(aa / err2)
        rel = math.sqrt(err2 / aa) if aa > 0 else (0.0 if err2 == 0 else math.inf)
        return {
            "cosine": _float(self.cos_sum) / self.n_samples if self.n_samples else math.nan,
            "cosine_global": float(_cosines(np.array([dot]), np.array([aa]), np.array([bb]))[0]),
            "min_cosine": self.min_cos if self.n_samples else math.nan,
            "worst_sample": self.worst_sample,
            "sqnr_db": sqnr,
            "max_abs_error": self.max_abs_err,
            "mean_abs_error": _float(self.abs_err) / n,
            "relative_error": rel,
            "n_values": self.n_values,
            "n_samples": self.n_samples,
            "n_nonfinite": self.n_nonfinite,
        }


@dataclass
class TaskAccumulator:
    """Classifier metrics of one output [N, C]: top-1 agreement and, with labels, both accuracies."""

    n: int = 0
    agree: int = 0
    n_labelled: int = 0
    correct_fp32: int = 0
    correct_int8: int = 0
    classes: int = 0
    bad_labels: list[str] = field(default_factory=list)

    @staticmethod
    def applies(shape: tuple[int, ...]) -> bool:
        """True for [N, C] outputs with C >= 2 (class scores, logits or probabilities)."""
        return len(shape) == 2 and (shape[1] or 0) >= 2

    def update(self, a: np.ndarray, b: np.ndarray, labels: Sequence[int | None] | None = None) -> None:
        ta, tb = np.argmax(a, axis=1), np.argmax(b, axis=1)
        self.classes = a.shape[1]
        self.n += len(ta)
        self.agree += int((ta == tb).sum())
        if labels is not None:
            for i, lab in enumerate(labels):
                if lab is None:
                    continue
                self.n_labelled += 1
                self.correct_fp32 += int(ta[i] == lab)
                self.correct_int8 += int(tb[i] == lab)

    def merge(self, other: "TaskAccumulator") -> "TaskAccumulator":
        return TaskAccumulator(self.n + other.n, self.agree + other.agree, self.n_labelled + other.n_labelled,
                               self.correct_fp32 + other.correct_fp32, self.correct_int8 + other.correct_int8,
                               max(self.classes, other.classes))

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"top1_agreement": self.agree / self.n if self.n else math.nan, "classes": self.classes}
        if self.n_labelled:
            out["accuracy_fp32"] = self.correct_fp32 / self.n_labelled
            out["accuracy_int8"] = self.correct_int8 / self.n_labelled
            out["n_labelled"] = self.n_labelled
        return out


def safe_float(x: Any) -> Any:
    """JSON has no inf/nan: write them as strings "inf", "-inf", "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: safe_float(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [safe_float(v) for v in x]
    if isinstance(x, np.floating):
        return safe_float(float(x))
    if isinstance(x, np.integer):
        return int(x)
    return x


def unsafe_float(x: Any) -> Any:
    """Inverse of ``safe_float``."""
    if x in ("inf", "-inf", "nan"):
        return float(x)
    if isinstance(x, dict):
        return {k: unsafe_float(v) for k, v in x.items()}
    if isinstance(x, list):
        return [unsafe_float(v) for v in x]
    return x

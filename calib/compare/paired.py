"""Paired per-sample comparison of two INT8 variants on the same samples: does a change really help?

Choices made on few samples (``auto``'s selection split is ~25 % of the calibration data, e.g. 32 of
128) may over-fit when they accept any change that moves an aggregate by a hair. So every accept/reject
decision of the default path (auto's per-tensor changes, its transform candidates, bias correction)
compares the two variants sample by sample and records how firm the gain is (mean, standard error, t,
samples that improved); the threshold in standard errors is the caller's.

Per-sample loss. For sample i and graph output o, ``e_io = |int8 - fp32|^2`` summed over the output's
values and ``A_o = sum_i |fp32_io|^2`` (the output's FP32 energy over the samples compared). The loss
of sample i is ``l_i = sum_o e_io / A_o``, so ``sum_i l_i = sum_o 1 / SNR_o``: the sum over outputs of
each output's pooled noise-to-signal ratio. For one output, a lower total loss is exactly a higher output
SQNR (``calib.compare.metrics``); for several, the worst output dominates, as in "lowest output SQNR".
``A_o`` is fixed by the FP32 model, so the difference of two variants' losses is a per-sample quantity.

Decision (``paired_gain`` and ``Gain.significant(k)``). With ``d_i = l_i(current) - l_i(candidate)``
(positive: the candidate is better on sample i), ``n`` samples, mean ``m`` and standard error
``se = sd(d) / sqrt(n)``, the candidate is accepted only if ``m > 0``, ``m > k * se`` (``k = 2``: a
one-sided paired t-test at about 97.5 %) and ``m`` exceeds a relative tolerance of the current loss.
With ``k > 0`` a gain carried by one sample (standard error as large as itself) is refused, while a gain
on the outlier samples only (a range that must keep rare large values) is accepted when it is large
enough, which a majority vote of samples would refuse. Ties (``m = 0``) are never accepted. The default
path uses ``k = 0`` (``calib.compare.auto.TENSOR_MIN_T``, ``calib.pipeline.scoring.TRANSFORM_MIN_T``):
larger thresholds were measured and did not do better on held-out data; the recorded ``t`` and
``wins`` show how firm each decision was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["MIN_T", "REL_TOL", "SampleErrors", "Gain", "paired_gain"]

MIN_T = 2.0  # Gain.significant's default threshold (the pipeline passes its own: 0, see calib.compare.auto)
REL_TOL = 1e-6  # ... and more than this fraction of the current loss


@dataclass
class SampleErrors:
    """Per sample id and graph output: squared error ``err2`` and FP32 energy ``energy`` (float64)."""

    outputs: list[str]
    err2: dict[str, np.ndarray] = field(default_factory=dict)  # sample id -> [n_outputs]
    energy: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, output: str, ids: Sequence[str], err2: np.ndarray, energy: np.ndarray) -> None:
        """One output's per-sample sums for a batch (``TensorAccumulator.update`` computes them: non-finite
        values left out)."""
        k = self.outputs.index(output)
        e, en = np.asarray(err2, np.float64), np.asarray(energy, np.float64)
        for i, sid in enumerate(ids):
            self.err2.setdefault(sid, np.zeros(len(self.outputs)))[k] = e[i]
            self.energy.setdefault(sid, np.zeros(len(self.outputs)))[k] = en[i]

    def merge(self, other: "SampleErrors") -> "SampleErrors":
        return SampleErrors(self.outputs, {**self.err2, **other.err2}, {**self.energy, **other.energy})

    def losses(self, ids: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
        """``(ids, l)``: each sample's loss (module docstring), in ``ids`` order (default: sorted ids)."""
        ids = sorted(self.err2) if ids is None else list(ids)
        if not ids:
            return ids, np.zeros(0)
        e = np.stack([self.err2[i] for i in ids])
        a = np.stack([self.energy[i] for i in ids]).sum(axis=0)
        scale = np.where(a > 0, a, 1.0)  # an output that is all zeros in FP32: its absolute error counts
        return ids, (e / scale).sum(axis=1)


@dataclass(frozen=True)
class Gain:
    """A candidate against the current model on the same samples (loss units; positive: candidate better)."""

    mean: float  # mean of d_i = l_i(current) - l_i(candidate)
    se: float  # its standard error
    n: int
    current: float  # mean loss of the current model
    wins: int  # samples on which the candidate's loss is lower
    ids: tuple[str, ...] = ()

    @property
    def t(self) -> float:
        if self.se > 0:
            return self.mean / self.se
        return math.inf if self.mean > 0 else (-math.inf if self.mean < 0 else 0.0)

    def significant(self, min_t: float = MIN_T, rel_tol: float = REL_TOL) -> bool:
        """The candidate is better by more than ``min_t`` standard errors and the relative tolerance."""
        if not (math.isfinite(self.mean) and self.mean > 0):
            return False
        return self.mean > min_t * self.se and self.mean > rel_tol * abs(self.current)

    def to_json(self) -> dict:
        return {"mean_gain": self.mean, "se": self.se, "t": self.t if math.isfinite(self.t) else None,
                "n": self.n, "wins": self.wins}


def paired_gain(current: SampleErrors, candidate: SampleErrors) -> Gain:
    """``Gain`` of ``candidate`` over ``current`` on the samples both saw (normalised by their FP32 energy).

    A sample whose loss is not finite in either model makes the gain undefined (NaN): never significant."""
    ids = sorted(set(current.err2) & set(candidate.err2))
    _, lc = current.losses(ids)
    _, lk = candidate.losses(ids)
    n = len(ids)
    if n == 0:
        return Gain(math.nan, math.nan, 0, math.nan, 0)
    d = lc - lk
    if not np.all(np.isfinite(d)):
        return Gain(math.nan, math.nan, n, float(np.mean(lc)), 0, tuple(ids))
    se = float(np.std(d, ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return Gain(float(d.mean()), se, n, float(lc.mean()), int((d > 0).sum()), tuple(ids))

"""Compare's pass over the evaluation data: per-layer, local-error and output accumulators, mergeable by shard.

``run_layer_pass`` runs the FP32 model (with its local-error copies, ``calib.compare.local``) and the Q/DQ
model over a range of samples and folds every batch into exact accumulators (``calib.compare.metrics``:
integer sums, max, the first lowest cosine). ``LayerPass.merge`` of consecutive shards, in sample order,
equals one pass over their union bit for bit, provided the shards start on the batch boundaries a single
pass makes (``batch_starts``): each batch then runs with the same samples on the same kernels. The Ray
evaluation backend (``calib.compare.ray_eval``) runs shards on its workers with this function; ``compare``
runs it here otherwise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import onnx

from calib.compare.metrics import TensorAccumulator
from calib.compare.targets import OutputMetrics
from calib.errors import ModelError
from calib.model import Model
from calib.runtime import Runner, make_session, mark_outputs, run_batches, usable_cpus

__all__ = ["LayerJob", "LayerPass", "run_layer_pass", "batch_starts"]

Progress = Callable[[str, int, "int | None"], None]


@dataclass(frozen=True)
class LayerJob:
    """What a pass needs besides the data (picklable: protos and names)."""

    fp32_proto: onnx.ModelProto  # the FP32 model with its local-error copies (or the FP32 model alone)
    qdq_proto: onnx.ModelProto
    pairs: tuple[tuple[str, str, str], ...]  # (FP32 tensor, Q/DQ tensor, FP32 node) per compared layer
    local_pairs: dict[str, str]  # FP32 tensor -> its local INT8 copy (``LocalModel.pairs``)
    outputs: tuple[str, ...]  # the model's outputs
    user: Any = None  # ``UserMetric`` or None
    batch_size: int = 16
    optimization: str = "disable"
    providers: tuple[str, ...] | None = None

    @property
    def fp32_outputs(self) -> list[str]:
        return [f for f, _, _ in self.pairs] + list(self.outputs) + list(self.local_pairs) + list(
            self.local_pairs.values())

    @property
    def qdq_outputs(self) -> list[str]:
        return [q for _, q, _ in self.pairs] + list(self.outputs)


@dataclass
class LayerPass:
    """The accumulators of one pass (or of merged shards) and its sample count."""

    layers: dict[str, TensorAccumulator]  # FP32 tensor -> accumulated error
    local: dict[str, TensorAccumulator]  # FP32 tensor -> local error
    outputs: OutputMetrics
    n: int = 0
    seconds: list[float] = field(default_factory=list)  # per shard, where it ran

    def merge(self, other: "LayerPass") -> "LayerPass":
        """Both shards folded, ``self``'s samples first (ties of the lowest cosine go to the earlier sample)."""
        def both(a: dict[str, TensorAccumulator], b: dict[str, TensorAccumulator]) -> dict[str, TensorAccumulator]:
            return {k: a[k].merge(b[k]) if k in a and k in b else a.get(k) or b[k] for k in {**a, **b}}

        return LayerPass(both(self.layers, other.layers), both(self.local, other.local),
                         self.outputs.merge(other.outputs), self.n + other.n, self.seconds + other.seconds)


def batch_starts(model: Model, source, batch_size: int, n: int) -> list[int]:
    """Where a single pass's batches start (``calib.data.batches``: a fixed batch dimension or the feed layout
    wins over ``batch_size``)."""
    fixed = {s.shape[0] for s in model.inputs if s.shape and s.shape[0] is not None}
    step = 1 if getattr(source, "layout", "batch") == "feed" else (fixed.pop() if len(fixed) == 1 else batch_size)
    return list(range(0, n, step))


@contextlib.contextmanager
def _runners(job: LayerJob, threads: int | None) -> Iterator[tuple[Runner, Runner]]:
    cpus = threads or usable_cpus()
    made = [make_session(mark_outputs(p, outs), job.providers, intra_op_threads=cpus, inter_op_threads=cpus,
                         optimization=job.optimization, name=name)
            for p, outs, name in ((job.fp32_proto, job.fp32_outputs, "FP32 model"),
                                  (job.qdq_proto, job.qdq_outputs, "Q/DQ model"))]
    try:
        yield (Runner(made[0], list(dict.fromkeys(job.fp32_outputs))),
               Runner(made[1], list(dict.fromkeys(job.qdq_outputs))))
    finally:
        del made


def run_layer_pass(job: LayerJob, model: Model, source, *, labels: Sequence[int] | None = None,
                   limit: int | None = None, threads: int | None = None, progress: Progress | None = None,
                   total: int | None = None) -> LayerPass:
    """Fold the first ``limit`` samples of ``source`` (``model`` gives the inputs; ``labels`` one per sample of
    ``source``); ``threads``: ONNX Runtime threads (default: the usable CPUs)."""
    out = LayerPass({f: TensorAccumulator() for f, _, _ in job.pairs},
                    {f: TensorAccumulator() for f in job.local_pairs}, OutputMetrics(list(job.outputs), job.user))
    with _runners(job, threads) as (rf, rq):
        for ids, labs, (fa, qa) in run_batches(source, model, job.batch_size, [rf, rq], labels, limit):
            for f, q, node in job.pairs:
                try:
                    out.layers[f].update(fa[f], qa[q], ids)
                except ValueError as e:
                    raise ModelError(f"tensor '{f}' (node '{node}'): {e}",
                                     hint="the Q/DQ model computes a different shape here") from None
            out.outputs.update(fa, qa, ids, labs)
            for f, loc in job.local_pairs.items():
                out.local[f].update(fa[f], fa[loc], ids)
            del fa, qa
            out.n += len(ids) if ids is not None else 1
            if progress:
                progress("compare", out.n, total)
    return out

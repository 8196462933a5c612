"""The whole loop as one plan: collect -> calibrate -> choose ranges -> advise -> transforms -> verify -> write.

``quantize`` is the one-shot path (``calib quantize``): files in, files out.
``execute`` runs a ``RunConfig`` into a run directory of a ``RunStore``
(``calib run``, ``calib demo``, the dashboard's "new run" and "re-calibrate").
Both run the same plan (``calib.pipeline.core``); they differ only in where the
artifacts go (``calib.pipeline.sinks``). Plug-in points: ``register_chooser``
(the "choose ranges" step, keyed by method name) and ``register_transform``.

Modules: ``core`` (plan, entry points), ``steps`` (the steps and their registries),
``sinks`` (files vs run directory, artifact writing), ``scoring`` (output metrics,
'best', bias correction kept or not), ``inputs`` (data, subsets, non-finite policy).
"""

from calib.pipeline.core import (DEFAULT_METHODS, STEPS, QuantizeResult, config_from_flags, execute, quantize,
                                 run_plan, summary)
from calib.export import flagged_tensors
from calib.pipeline.inputs import open_run_data, subset_by_ids
from calib.pipeline.scoring import (BC_SUFFIX, best_key, score_methods, score_outputs, task_metrics)
from calib.pipeline.sinks import FileSink, RunSink, method_file_label
from calib.pipeline.steps import CHOOSERS, TRANSFORMS, Context, register_chooser, register_transform

_score = best_key  # the name tests and older callers use

__all__ = ["quantize", "execute", "QuantizeResult", "config_from_flags", "run_plan", "summary", "STEPS",
           "DEFAULT_METHODS", "open_run_data", "subset_by_ids", "flagged_tensors", "BC_SUFFIX", "best_key",
           "score_methods", "score_outputs", "task_metrics", "FileSink", "RunSink", "method_file_label",
           "CHOOSERS", "TRANSFORMS", "Context", "register_chooser", "register_transform"]

"""``calib collect`` and ``calib calibrate``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from calib.calibrate import METHODS, calibrate_all, save_ranges, weight_ranges
from calib.cli._common import Progress, echo
from calib.collect import collect
from calib.data.uri import open_data_uri
from calib.distributed import collect_sharded, resolve_max_memory
from calib.model import load_model
from calib.stats import ActivationStats
from calib.config import DEFAULT_BATCH_SIZE
from calib.cli._preprocess import load_spec, preprocess_option, show_spec

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    app.command(name="collect", epilog="Example: calib collect model.onnx --data calib.npz -o stats.npz")(collect_cmd)
    app.command(name="calibrate",
                epilog="Example: calib calibrate stats.npz --method all -o ranges.json")(calibrate_cmd)


def collect_cmd(
    model: Path = typer.Argument(..., help="FP32 ONNX model (never modified)."),
    data: str = typer.Option(..., "--data", "-d", help="Calibration data: .npz (arrays keyed by input name, "
                             "first axis = sample), .npy, an image folder or a manifest; a path or a URI "
                             "(file://, s3://, ... with the [ray] extra)."),
    output: Path = typer.Option(..., "--output", "-o", help="Statistics file to write (.npz)."),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", "-b", help="Samples per ONNX Runtime run."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most this many samples."),
    provider: List[str] = typer.Option(["cpu"], "--provider", help="ONNX Runtime execution provider(s)."),
    preprocess: Optional[Path] = preprocess_option(),
    backend: str = typer.Option("local", "--backend", help="local (this process) or ray (shards as Ray tasks)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start a local "
                                          "Ray)."),
    num_workers: int = typer.Option(2, "--num-workers", help="Ray tasks at once (one CPU each)."),
    max_memory: str = typer.Option("auto", "--max-memory", help="Memory bound per worker for exposed "
                                   "activations, e.g. 2GB; auto = half the available RAM; none = no bound."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and list) samples that cannot be read or "
                                  "do not fit the model."),
) -> None:
    """Stream calibration data through the FP32 model and save mergeable per-tensor statistics."""
    m = load_model(model)
    for note in m.notes:
        echo(f"model: {note}")
    bound = resolve_max_memory(max_memory, num_workers if backend == "ray" and not address else 1)
    spec = load_spec(preprocess)
    prog = Progress()
    try:
        if backend != "local" or skip_bad:  # sharded path: ray, or samples checked one by one
            res = collect_sharded(model, data, backend=backend, address=address, num_workers=num_workers,
                                  batch_size=batch_size, skip_bad=skip_bad, max_memory=bound, providers=provider,
                                  limit=limit, progress=prog, spec=str(preprocess) if preprocess else None)
            stats, skipped_samples = res.stats, res.skipped
        else:
            source = open_data_uri(data, m, spec=spec, skip_bad=skip_bad)
            show_spec(source, "calibration data")
            stats = collect(m, source, batch_size=batch_size, limit=limit, providers=provider, progress=prog,
                            max_memory=bound)
            skipped_samples = dict(getattr(source, "skipped", {}) or {})
    finally:
        prog.close()
    stats.save(output)
    skipped = stats.meta.get("skipped", {})
    echo(f"collected {len(stats.tensors)} tensors over {stats.n_samples} samples -> {output}")
    nonfinite = {k: h.n_nonfinite for k, h in stats.tensors.items() if h.n_nonfinite}
    if nonfinite:
        echo(f"non-finite values excluded from {len(nonfinite)} tensor(s), e.g. "
             + ", ".join(f"{k}: {v}" for k, v in list(nonfinite.items())[:3]))
    if skipped:
        echo(f"skipped {len(skipped)} non-float tensor(s): " + ", ".join(list(skipped)[:5]))
    if skipped_samples:
        echo(f"left out {len(skipped_samples)} sample(s): " + ", ".join(list(skipped_samples)[:10]))


def calibrate_cmd(
    stats: Path = typer.Argument(..., help="Statistics from 'calib collect'."),
    method: str = typer.Option("all", "--method", "-m",
                               help="entropy | minmax | percentile[:P] | mse | all (comma-separated list ok)."),
    output: Path = typer.Option(..., "--output", "-o", help="ranges.json to write."),
    model: Optional[Path] = typer.Option(None, "--model", help="Also write per-channel weight ranges of this model."),
) -> None:
    """Turn statistics into per-tensor INT8 ranges (amax, scale = amax/127) with one or more methods."""
    st = ActivationStats.load(stats)
    methods = list(METHODS) if method == "all" else [m.strip() for m in method.split(",") if m.strip()]
    ranges = calibrate_all(st, methods)
    weights = None
    if model is not None:
        m = load_model(model)
        st.check_model(m)
        weights = weight_ranges(m)
    save_ranges(output, ranges, weights, st)
    degenerate = sum(1 for r in ranges.values() for t in r.tensors.values() if t.degenerate)
    echo(f"{len(st.tensors)} tensors x {len(ranges)} method(s) ({', '.join(ranges)}) -> {output}")
    if degenerate:
        echo(f"{degenerate} range(s) used a fallback (see 'degenerate' in {output})")

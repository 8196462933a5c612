"""``calib sample`` (choose a calibration subset) and ``calib coverage`` (how well it covers its pool)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from calib.calibrate import parse_method
from calib.cli._common import Progress, echo
from calib.data import open_source
from calib.data.preprocess import PreprocessSpec
from calib.coverage import coverage, write_html
from calib.data.sampling import STRATEGIES, Subset, apply_subset
from calib.data.sources import ImageFolderSource, ManifestSource
from calib.errors import ConfigError
from calib.io import write_json
from calib.model import load_model
from calib.subset import sample_source

__all__ = ["register"]

_DATA_HELP = ("Data: .npz/.npy (arrays keyed by input name), an image folder (class = subfolder), or a CSV/JSONL "
              "manifest (path,label,split; 'manifest.csv#eval' picks a split).")


def register(app: typer.Typer) -> None:
    app.command(name="sample", epilog="Example: calib sample pages/ --n 256 --strategy kcenter --model model.onnx "
                "-o subset.json")(sample_cmd)
    app.command(name="coverage", epilog="Example: calib coverage pages/ --subset subset.json --model model.onnx "
                "-o coverage.json --html coverage.html")(coverage_cmd)


def _open(data: Path, model: Optional[Path], preprocess: Optional[Path], skip_bad: bool, confine: bool):
    if model is None and (data.is_dir() or Path(str(data).partition("#")[0]).suffix.lower() in (".csv", ".jsonl")):
        # no model: images only feed the cheap descriptor, so any preprocessing will do
        spec = PreprocessSpec.load(preprocess) if preprocess is not None else PreprocessSpec()
        if data.is_dir():
            return None, ImageFolderSource(data, spec, "image", skip_bad=skip_bad)
        text, _, split = str(data).partition("#")
        return None, ManifestSource(text, spec, "image", split=split or None, confine=confine, skip_bad=skip_bad)
    m = load_model(model) if model is not None else None
    src = open_source(str(data), m, spec=preprocess, skip_bad=skip_bad, confine=confine)
    return m, src


def _report_skipped(src) -> None:
    skipped = getattr(src, "skipped", {})
    if skipped:
        echo(f"skipped {len(skipped)} bad sample(s) (--skip-bad), e.g. {next(iter(skipped.values()))}")


def sample_cmd(
    data: Path = typer.Argument(..., help=_DATA_HELP),
    n: int = typer.Option(256, "--n", "-n", help="Number of samples to choose."),
    strategy: str = typer.Option("kcenter", "--strategy", "-s", help="random | stratified | kmeans | kcenter."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="FP32 ONNX model: its pooled late "
                                         "activations are the features (else a cheap image descriptor)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same subset)."),
    output: Path = typer.Option(..., "--output", "-o", help="subset.json to write."),
    preprocess: Optional[Path] = typer.Option(None, "--preprocess", help="Preprocessing spec (JSON); default: "
                                              "guessed from the model."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images and count them instead of "
                                  "stopping."),
    confine: bool = typer.Option(False, "--confine", help="Refuse manifest rows outside the manifest's folder."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Samples per ONNX Runtime run."),
) -> None:
    """Choose a representative calibration subset of DATA and save its sample ids."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{strategy}' (known: {', '.join(STRATEGIES)})")
    m, src = _open(data, model, preprocess, skip_bad, confine)
    prog = Progress()
    try:
        sub = sample_source(src, n, strategy, model=m, seed=seed, data=str(data), batch_size=batch_size,
                            progress=prog)
    finally:
        prog.close()
    sub.save(output)
    _report_skipped(src)
    extra = f", k-center radius {sub.radius:.3f}" if sub.radius is not None else ""
    counts = f", classes {sub.label_counts}" if sub.label_counts else ""
    echo(f"{len(sub.indices)} of {sub.pool_size} samples ({strategy}, seed {seed}{extra}{counts}) -> {output}")


def coverage_cmd(
    data: Path = typer.Argument(..., help=_DATA_HELP + " The pool the subset was drawn from."),
    subset: Path = typer.Option(..., "--subset", help="subset.json from 'calib sample'."),
    model: Path = typer.Option(..., "--model", "-m", help="FP32 ONNX model."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="coverage.json to write."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write the figures as one HTML page."),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="Evaluation data for the agreement curve "
                                             "(default: the pool)."),
    method: str = typer.Option("entropy", "--method", help="Calibration method for the ranges and the curve."),
    curve: bool = typer.Option(True, "--curve/--no-curve", help="Compute the INT8 agreement curve (exports and "
                               "runs one INT8 model per subset size)."),
    curve_strategy: str = typer.Option("random", "--curve-strategy", help="How the curve's subsets are drawn."),
    placement: str = typer.Option("trt", "--placement", help="Q/DQ placement of the curve's INT8 models."),
    seed: int = typer.Option(0, "--seed"),
    preprocess: Optional[Path] = typer.Option(None, "--preprocess", help="Preprocessing spec (JSON)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images and count them."),
    confine: bool = typer.Option(False, "--confine", help="Refuse manifest rows outside the manifest's folder."),
    batch_size: int = typer.Option(16, "--batch-size", "-b"),
) -> None:
    """Compare a subset's ranges, feature-space radius, class balance and INT8 agreement with its pool's."""
    parse_method(method)
    sub = Subset.load(subset)
    m, pool = _open(data, model, preprocess, skip_bad, confine)
    apply_subset(pool, sub)  # checks that the subset was drawn from this pool
    ev = open_source(str(eval_data), m, spec=preprocess, skip_bad=skip_bad) if eval_data is not None else None
    prog = Progress()
    try:
        rep = coverage(m, pool, sub.indices, eval_source=ev, method=method, strategy=curve_strategy, seed=seed,
                       curve=curve, placement=placement, batch_size=batch_size, progress=prog)
    finally:
        prog.close()
    _report_skipped(pool)
    s, fs = rep["summary"], rep["feature_space"]
    echo(f"subset {rep['subset_size']} of {rep['pool_size']}: median amax ratio {s['median_amax_ratio']:.3f}, "
         f"worst tensor clips {100 * s['max_clipped_pool_fraction']:.3f}% of the pool's values; k-center radius "
         f"{fs['kcenter_radius']:.3f} (random: {fs['random_radius_median']:.3f})")
    if rep["curve"]:
        pts = " ".join(f"{p['size']}:{100 * p['top1_agreement']:.1f}%" for p in rep["curve"]["points"])
        echo(f"INT8 top-1 agreement by calibration size: {pts}")
    if output is not None:
        write_json(output, rep)
        echo(f"-> {output}")
    if html is not None:
        write_html(rep, html)
        echo(f"-> {html}")

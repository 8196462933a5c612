"""Data: samples and sources (arrays, images, manifests), preprocessing, sampling, coverage."""

from calib.data.arrays import NpzSource
from calib.data.base import ListSource, Sample, Source, batches, check_feeds

__all__ = ["Sample", "Source", "ListSource", "NpzSource", "batches", "check_feeds"]


def open_data(path, model=None):
    """Open calibration/evaluation data by path: .npz/.npy arrays here; folders and manifests when
    ``calib.data.sources`` provides them."""
    from pathlib import Path

    p = Path(path)
    if p.suffix in (".npz", ".npy"):
        return NpzSource(p, model.inputs if model is not None else None)
    try:
        from calib.data.sources import open_source
    except ImportError:
        from calib.errors import InputDataError

        raise InputDataError(f"{p}: unsupported data (expected .npz or .npy)") from None
    return open_source(p, model)


__all__.append("open_data")

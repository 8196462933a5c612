"""Data: samples and sources (arrays, images, manifests), preprocessing, sampling, coverage."""

from calib.data.arrays import NpzSource
from calib.data.base import ListSource, Sample, Source, batches, check_feeds

__all__ = ["Sample", "Source", "ListSource", "NpzSource", "batches", "check_feeds"]

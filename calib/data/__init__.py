"""Data: samples and sources (arrays, images, manifests), preprocessing, sampling, coverage."""

from calib.data.arrays import NpzSource
from calib.data.base import ListSource, Sample, Source, batches, check_feeds
from calib.data.preprocess import PreprocessSpec, check_spec, guess_preprocess
from calib.data.recipes import load_recipe
from calib.data.sources import ImageFolderSource, ImageSource, ManifestSource, open_source
from calib.data.tokens import TokenSource, pad_sequences

__all__ = ["Sample", "Source", "ListSource", "NpzSource", "batches", "check_feeds", "open_data",
           "PreprocessSpec", "guess_preprocess", "check_spec", "ImageSource", "ImageFolderSource", "ManifestSource",
           "open_source", "TokenSource", "pad_sequences", "load_recipe"]


def open_data(path, model=None, **options):
    """Open calibration/evaluation data by path (``.npz``/``.npy``, image folder, manifest, token JSONL).

    Same as ``open_source``; ``options`` are its keyword arguments (spec, split, confine, skip_bad, classes).
    """
    return open_source(path, model, **options)

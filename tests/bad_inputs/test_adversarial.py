"""Issue 18's adversarial corpus: one test per case, each item of the issue by number.

Every case runs the real command in-process (``calib.cli.main``) and checks the exit code, that the error is ONE
line (``calib: error: ...`` or ``calib: usage: ...``, an optional ``hint:`` after it, never a traceback), and that
every input is byte-identical afterwards (sha256 before and after). The broken inputs are built in ``tmp_path``
from the small graphs of tests/models.py, so the corpus needs no binary files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import models  # noqa: E402

from calib.cli import main  # noqa: E402
from calib.errors import RunStoreError  # noqa: E402
from calib.io import atomic_path, write_bytes  # noqa: E402
from calib.runs import RunStore  # noqa: E402
from calib.stats import ActivationStats  # noqa: E402


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hashes(*paths: Path) -> dict[Path, str]:
    return {Path(p): sha256(p) for p in paths}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, prefix: str = "calib: error:") -> str:
    """The single error line (checked: exactly one, no traceback, nothing but an optional hint after it)."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith(("calib: error:", "calib: usage:"))]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), err
    return lines[0]


def refused(capsys, text: str, *argv, inputs=(), code: int = 2) -> str:
    before = hashes(*inputs)
    rc, _, err = run(capsys, *argv)
    assert rc == code, err
    line = one_line(err)
    assert text in line, line
    assert hashes(*inputs) == before, "an input changed"
    return line


def fake_npy(shape: tuple, dtype: str = "<f4", payload: bytes = b"") -> bytes:
    """An .npy whose header declares ``shape`` but holds only ``payload`` (numpy refuses to write negative dims)."""
    head = {"descr": dtype, "fortran_order": False, "shape": shape}
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, head)
    return b.getvalue() + payload


def npz_of(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in members.items():
            zf.writestr(k + ".npy", v)
    return path


@pytest.fixture()
def mlp(tmp_path):
    """gemm_mlp (input x (N, 10)) and 6 samples of data."""
    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(models.gemm_mlp(), str(model))
    np.savez(data, x=np.random.default_rng(0).normal(0, 1, (6, 10)).astype(np.float32))
    return model, data


@pytest.fixture()
def stats(tmp_path, mlp, capsys):
    model, data = mlp
    out = tmp_path / "s.npz"
    assert run(capsys, "collect", model, "--data", data, "-o", out)[0] == 0
    return out


@pytest.fixture()
def qdq(tmp_path, mlp, capsys):
    model, data = mlp
    out = tmp_path / "q.onnx"
    assert run(capsys, "-q", "quantize", model, "--data", data, "-o", out)[0] == 0
    return out


# ---- 1. outputs never overwrite inputs ----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["same", "dotdot", "symlink", "hardlink", "cache", "report"])
def test_1_quantize_output_is_an_input(case, tmp_path, mlp, capsys):
    model, data = mlp
    (tmp_path / "sub").mkdir()
    args = {"same": ["-o", model], "dotdot": ["-o", tmp_path / "sub" / ".." / "d.npz"],
            "cache": ["-o", tmp_path / "q.onnx", "--cache", data],
            "report": ["-o", tmp_path / "q.onnx", "--report", model]}
    if case == "symlink":
        (tmp_path / "link.onnx").symlink_to(model)
        args[case] = ["-o", tmp_path / "link.onnx"]
    if case == "hardlink":
        os.link(data, tmp_path / "hard.npz")
        args[case] = ["-o", tmp_path / "hard.npz"]
    refused(capsys, "refusing to write over an input", "quantize", model, "--data", data, *args[case],
            inputs=[model, data])
    assert not (tmp_path / "q.onnx").exists()


def test_1_collect_output_is_the_data(tmp_path, mlp, capsys):
    model, data = mlp
    refused(capsys, "refusing to write over an input", "collect", model, "--data", data, "-o", data,
            inputs=[model, data])


def test_1_export_output_is_the_external_data_file(tmp_path, mlp, capsys):
    _, data = mlp
    (tmp_path / "ext").mkdir()
    model = tmp_path / "ext" / "model.onnx"
    onnx.save(models.gemm_mlp(), str(model), save_as_external_data=True, location="model.data", size_threshold=0)
    st = tmp_path / "s.npz"
    assert run(capsys, "collect", model, "--data", data, "-o", st)[0] == 0
    refused(capsys, "refusing to write over an input", "export", model, "--stats", st,
            "-o", tmp_path / "ext" / "model.data", inputs=[model, tmp_path / "ext" / "model.data", st])


def test_1_export_cache_over_the_stats(tmp_path, mlp, stats, capsys):
    model, _ = mlp
    refused(capsys, "refusing to write over an input", "export", model, "--stats", stats, "-o",
            tmp_path / "q2.onnx", "--cache", stats, inputs=[model, stats])


def test_1_calibrate_output_over_the_stats(tmp_path, stats, capsys):
    refused(capsys, "refusing to write over an input", "calibrate", stats, "-o", stats, inputs=[stats])


def test_1_compare_output_over_the_compared_model(tmp_path, mlp, qdq, capsys):
    model, data = mlp
    refused(capsys, "refusing to write over an input", "compare", model, qdq, "--data", data,
            "-o", tmp_path / "c.json", "--html", qdq, inputs=[model, qdq, data])


# ---- 2. special files are written directly, never renamed over -------------------------------------------------
def test_2_output_to_dev_null_keeps_the_device(mlp, capsys):
    model, data = mlp
    rc, _, err = run(capsys, "-q", "quantize", model, "--data", data, "-o", "/dev/null")
    assert rc == 0, err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_2_output_to_a_fifo_is_written_through_it(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    write_bytes(fifo, b"calib" * 1000)
    reader.join(10)
    assert got == [b"calib" * 1000]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temp file left beside it


# ---- 3. the CLI contract, in-process (tests/test_cli_contract.py runs the console script) ------------------------
@pytest.mark.parametrize("argv, text", [
    (["collect", "--bogus"], "No such option"),
    (["collect", "m.onnx", "--data", "d.npz"], "Missing option"),
    (["collect", "m.onnx", "--data", "d.npz", "-o", "s.npz", "--batch-size", "abc"], "--batch-size"),
    (["nosuch"], "No such command"),
])
def test_3_usage_errors_exit_2_in_one_line(argv, text, capsys):
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert text in one_line(err, "calib: usage:")


def test_3_ctrl_c_exits_130(mlp, tmp_path, capsys, monkeypatch):
    import calib.cli.core  # the collect command calls the library's collect through its module-level import

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(calib.cli.core, "collect", interrupted)
    model, data = mlp
    rc, _, err = run(capsys, "collect", model, "--data", data, "-o", tmp_path / "s.npz")
    assert rc == 130 and "interrupted" in err and "Traceback" not in err


def test_3_dashboard_port_taken_exits_2(capsys):
    pytest.importorskip("streamlit")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, _, err = run(capsys, "dashboard", "--port", port, "--store", "nowhere")
    assert rc == 2
    assert "in use" in one_line(err)


# ---- 5. sizes come from headers and are checked before reading --------------------------------------------------
def test_5_npz_declaring_a_billion_samples(tmp_path, mlp, capsys):
    model, _ = mlp
    bad = npz_of(tmp_path / "big.npz", {"x": fake_npy((10**9, 10), payload=b"\0" * 400)})
    refused(capsys, "truncated", "collect", model, "--data", bad, "-o", tmp_path / "s.npz", inputs=[model, bad])


def test_5_labels_too_big(tmp_path, mlp, capsys, monkeypatch):
    import calib.data.arrays  # noqa: F401

    monkeypatch.setattr(sys.modules["calib.data.arrays"], "MAX_LABELS_BYTES", 40)  # 2e7 real labels would be 160 MB
    model, _ = mlp
    bad = tmp_path / "d.npz"
    np.savez(bad, x=np.zeros((6, 10), np.float32), labels=np.arange(6))
    refused(capsys, "'labels' declares 6 entries, more than calib reads", "collect", model, "--data", bad,
            "-o", tmp_path / "s.npz", inputs=[model, bad])


def test_5_labels_declared_bigger_than_the_member(tmp_path, mlp, capsys):
    model, _ = mlp
    x = io.BytesIO()
    np.save(x, np.zeros((6, 10), np.float32))
    bad = npz_of(tmp_path / "d.npz", {"x": x.getvalue(), "labels": fake_npy((2 * 10**7,), "<i8", b"\0" * 48)})
    refused(capsys, "truncated", "collect", model, "--data", bad, "-o", tmp_path / "s.npz", inputs=[model, bad])


def test_5_stats_member_declared_huge_is_refused_before_decompressing(tmp_path, stats, capsys):
    with np.load(stats) as z:
        arrays = {k: z[k] for k in z.files}
    members = {}
    for k, v in arrays.items():
        b = io.BytesIO()
        np.save(b, v)
        members[k] = b.getvalue()
    members["pos"] = fake_npy((10**9, 2048), "<i8", b"\0" * 64)
    bad = npz_of(tmp_path / "bad.npz", members)
    refused(capsys, "bytes", "calibrate", bad, "-o", tmp_path / "r.json", inputs=[bad])
    assert not (tmp_path / "r.json").exists()


def test_5_npy_with_a_negative_dimension(tmp_path, mlp, capsys):
    model, _ = mlp
    bad = tmp_path / "d.npy"
    bad.write_bytes(fake_npy((-5, 10), payload=b"\0" * 200))
    refused(capsys, "negative dimension", "collect", model, "--data", bad, "-o", tmp_path / "s.npz",
            inputs=[model, bad])


# ---- 6. inconsistent inputs give exit 2, never a traceback -----------------------------------------------------
def _stats_variants() -> dict:
    def header(**kw):
        h = {"format": "calib.stats", "version": 1, "model_sha256": "", "n_samples": 6, "sample_digest": "0",
             "num_bins": 2048, "meta": {}}
        h.update(kw)
        return lambda a: a.update(header=np.array(json.dumps(h)))

    def drop(k):
        return lambda a: a.pop(k)

    def setk(k, f):
        return lambda a: a.update({k: f(a[k])})

    return {
        "missing_pos": drop("pos"), "missing_names": drop("names"), "missing_header": drop("header"),
        "short_neg": setk("neg", lambda v: v[:, :10]), "short_n": setk("n", lambda v: v[:-1]),
        "negative_counts": setk("pos", lambda v: v - 5), "negative_n": setk("n", lambda v: -v),
        "nonfinite_over_n": setk("n_nonfinite", lambda v: v + 10**9), "exp_out_of_range": setk("exp", lambda v: v + 5000),
        "min_over_max": setk("min", lambda v: v + 1e9), "float_counts": setk("pos", lambda v: v.astype(np.float32)),
        "header_not_json": lambda a: a.update(header=np.array("{not json")),
        "header_bad_n_samples": header(n_samples=-3), "header_bad_digest": header(sample_digest="x"),
        "header_meta_list": header(meta=[1]), "header_bins": header(num_bins=7),
    }


@pytest.mark.parametrize("variant", sorted(_stats_variants()))
def test_6_inconsistent_stats(variant, tmp_path, stats, capsys):
    with np.load(stats) as z:
        arrays = {k: z[k] for k in z.files}
    _stats_variants()[variant](arrays)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    refused(capsys, str(bad), "calibrate", bad, "-o", tmp_path / "r.json", inputs=[bad])
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("doc, text", [
    ({"x": {"amax": 1e300}}, "no usable float32 scale"),
    ({"x": {"amax": 1e-45}}, "no usable float32 scale"),
    ({"x": [1.0]}, "expected {\"amax\": number}"),
    ([{"amax": 1.0}], "expected an object"),
    ({"x": {"amax": "big"}}, "expected {\"amax\": number}"),
])
def test_6_bad_ranges_json_writes_no_model(doc, text, tmp_path, mlp, capsys):
    model, _ = mlp
    r = tmp_path / "r.json"
    r.write_text(json.dumps({"format": "calib.ranges", "version": 1, "methods": {"minmax": doc}}))
    refused(capsys, text, "export", model, "--ranges", r, "-o", tmp_path / "q.onnx", inputs=[model, r])
    assert not (tmp_path / "q.onnx").exists()


def test_6_truncated_external_data(tmp_path, mlp, capsys):
    _, data = mlp
    model = tmp_path / "model.onnx"
    onnx.save(models.gemm_mlp(), str(model), save_as_external_data=True, location="w.data", size_threshold=0)
    w = tmp_path / "w.data"
    w.write_bytes(w.read_bytes()[:100])
    refused(capsys, "cannot read its external data", "collect", model, "--data", data, "-o", tmp_path / "s.npz",
            inputs=[model, w, data])


def test_6_read_only_run_store():
    with pytest.raises(RunStoreError, match="cannot create a run directory"):
        RunStore("/proc/self").create("t")  # even root cannot make a folder there


def _config(tmp_path: Path, model: Path, data: Path, extra: str = "") -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\nname = "t"\nstore = "{tmp_path / "store"}"\n[model]\npath = "{model}"\n'
                   f'[data]\ncalib = "{data}"\n[calibrate]\nmethods = ["minmax"]\nprimary = "minmax"\n'
                   f"[compare]\nhtml = false\n{extra}")
    return cfg


@pytest.mark.parametrize("case", ["non_utf8", "folder", "exclude_ints"])
def test_6_bad_config(case, tmp_path, mlp, capsys):
    model, data = mlp
    cfg = _config(tmp_path, model, data, "[export]\nexclude = [1, 2]\n" if case == "exclude_ints" else "")
    if case == "non_utf8":
        cfg.write_bytes(cfg.read_bytes() + b"# caf\xe9\n")
    if case == "folder":
        cfg = tmp_path / "cfgdir"
        cfg.mkdir()
    text = {"non_utf8": "not UTF-8", "folder": "a folder", "exclude_ints": "list of strings"}[case]
    refused(capsys, text, "run", cfg, inputs=[model, data] + ([cfg] if cfg.is_file() else []))
    assert not (tmp_path / "store").exists()


def test_6_non_utf8_manifest(tmp_path, capsys):
    man = tmp_path / "m.csv"
    man.write_bytes(b"path,label\nimg\xe9.png,1\n")
    refused(capsys, "cannot read manifest", "sample", man, "--n", "1", "-o", tmp_path / "s.json", inputs=[man])


def test_6_non_utf8_labels_file(tmp_path, mlp, qdq, capsys):
    model, data = mlp
    lab = tmp_path / "labels.txt"
    lab.write_bytes(b"1\n2\n\xff\n")
    refused(capsys, "not UTF-8", "compare", model, qdq, "--data", data, "--labels", lab, "-o", tmp_path / "c.json",
            inputs=[model, qdq, data, lab])


def test_6_labels_of_shape_8_by_2(tmp_path, mlp, capsys):
    model, _ = mlp
    bad = tmp_path / "d.npz"
    np.savez(bad, x=np.zeros((8, 10), np.float32), labels=np.zeros((8, 2), np.int64))
    refused(capsys, "expected one integer per sample", "collect", model, "--data", bad, "-o", tmp_path / "s.npz",
            inputs=[model, bad])


# ---- 7. IR version 3 -------------------------------------------------------------------------------------------
def test_7_ir3_model_exports(tmp_path, mlp, capsys):
    import onnxruntime as ort

    _, data = mlp
    m = models.gemm_mlp()
    m.ir_version = 3
    m.opset_import[0].version = 8
    for t in m.graph.initializer:  # IR 3: every initializer is also a graph input
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    model = tmp_path / "ir3.onnx"
    onnx.save(m, str(model))
    before = sha256(model)
    rc, _, err = run(capsys, "-q", "quantize", model, "--data", data, "-o", tmp_path / "q.onnx")
    assert rc == 0, err
    assert sha256(model) == before
    q = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(q)
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.zeros((2, 10), np.float32)})[0].shape == (2, 3)


# ---- 8. an already quantized model -----------------------------------------------------------------------------
def test_8_already_quantized_model_is_refused(tmp_path, mlp, qdq, capsys):
    _, data = mlp
    refused(capsys, "is already quantized", "quantize", qdq, "--data", data, "-o", tmp_path / "qq.onnx",
            inputs=[qdq, data])
    assert not (tmp_path / "qq.onnx").exists()


# ---- 9. the run store verifies what it reuses --------------------------------------------------------------------
def _complete_run(store: RunStore, stats_src: Path, **manifest):
    run = store.create("t", model={"sha256": "m"}, data={"fingerprint": "d"})
    run.update(stats_key="k", **manifest)
    write_bytes(run.add_artifact("stats", "stats.npz"), stats_src.read_bytes())
    run.seal("stats")
    run.complete()
    return run


def test_9_reused_stats_are_verified_and_copied(tmp_path, stats):
    store = RunStore(tmp_path / "store")
    run = _complete_run(store, stats)
    p = store.find_stats("m", "d", "k")
    assert p == run.dir / "stats.npz" and store.skipped == []
    store.copy_verified(p, tmp_path / "copy.npz")
    assert sha256(tmp_path / "copy.npz") == sha256(stats)


def test_9_corrupted_earlier_stats_are_skipped_and_reported(tmp_path, stats):
    store = RunStore(tmp_path / "store")
    run = _complete_run(store, stats)
    (run.dir / "stats.npz").write_bytes(b"corrupt")
    assert store.find_stats("m", "d", "k") is None
    assert len(store.skipped) == 1 and "changed since it was written" in store.skipped[0]
    assert run.dir.name in store.skipped[0]


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_9_planted_manifest_cannot_point_outside_its_run(how, tmp_path, stats):
    secret = tmp_path / "secret.npz"
    secret.write_bytes(stats.read_bytes())
    secret.chmod(0o600)
    store = RunStore(tmp_path / "store")
    run = _complete_run(store, stats)
    name = {"dotdot": "../../secret.npz", "absolute": str(secret), "symlink": "link.npz"}[how]
    if how == "symlink":
        (run.dir / "link.npz").symlink_to(secret)
    run.manifest["artifacts"]["stats"] = name
    run.manifest["sha256"]["stats"] = sha256(secret)  # the planter even knows the hash
    (run.dir / "run.json").write_text(json.dumps(run.manifest))
    assert store.find_stats("m", "d", "k") is None
    assert "outside the run directory" in store.skipped[0]


def test_9_run_without_recorded_hash_is_not_reused(tmp_path, stats):
    store = RunStore(tmp_path / "store")
    run = _complete_run(store, stats)
    del run.manifest["sha256"]
    (run.dir / "run.json").write_text(json.dumps(run.manifest))
    assert store.find_stats("m", "d", "k") is None and "no recorded sha256" in store.skipped[0]


def test_9_calib_run_after_a_corrupted_earlier_run(tmp_path, mlp, capsys):
    model, data = mlp
    cfg = _config(tmp_path, model, data)
    assert run(capsys, "-q", "run", cfg)[0] == 0
    (first,) = RunStore(tmp_path / "store").runs()
    (first.dir / "stats.npz").write_bytes(b"corrupt")
    rc, _, err = run(capsys, "-q", "run", cfg)
    assert rc == 0, err
    second = next(r for r in RunStore(tmp_path / "store").runs() if r.id != first.id)
    assert second.is_complete and "stats_reused_from" not in second.manifest
    assert first.id in second.manifest["stats_not_reused"][0]
    ActivationStats.load(second.dir / "stats.npz")


# ---- 10. file modes ----------------------------------------------------------------------------------------------
def test_10_new_files_honour_the_umask_and_replaced_files_keep_their_mode(tmp_path, mlp, capsys):
    model, data = mlp
    out = tmp_path / "s.npz"
    old = os.umask(0o022)
    try:
        assert run(capsys, "collect", model, "--data", data, "-o", out)[0] == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        out.chmod(0o640)
        assert run(capsys, "collect", model, "--data", data, "-o", out)[0] == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o640
        os.umask(0o077)
        with atomic_path(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"x")
        assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o600
    finally:
        os.umask(old)


# ---- 11. smaller ---------------------------------------------------------------------------------------------------
def test_11_nothing_quantizable_exits_2(tmp_path, mlp, capsys):
    _, data = mlp
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])])
    model = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(model))
    refused(capsys, "nothing to quantize", "quantize", model, "--data", data, "-o", tmp_path / "q.onnx",
            inputs=[model, data])
    assert not (tmp_path / "q.onnx").exists()


def test_11_exclude_reaches_every_node_of_a_duplicated_name(tmp_path, capsys):
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(5):
        inits.append(numpy_helper.from_array(rng.normal(0, 1, (8, 8)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name="n"))
        prev = f"h{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 8])], inits)
    model, data = tmp_path / "dup.onnx", tmp_path / "d.npz"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(model))
    np.savez(data, x=rng.normal(0, 1, (6, 8)).astype(np.float32))
    rc, _, err = run(capsys, "-q", "quantize", model, "--data", data, "-o", tmp_path / "q.onnx", "--exclude", "n")
    assert rc == 0, err  # all five kept float (before the fix: only the first of them)
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert not [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    rc, _, err = run(capsys, "-q", "quantize", model, "--data", data, "-o", tmp_path / "q1.onnx")
    assert rc == 0, err
    q = onnx.load(str(tmp_path / "q1.onnx"))
    assert sum(n.op_type == "MatMul" for n in q.graph.node) == 5
    assert len([n for n in q.graph.node if n.op_type == "DequantizeLinear"]) >= 5


def test_11_jsonl_string_label_is_a_class_name(tmp_path):
    from PIL import Image

    from calib.data.preprocess import PreprocessSpec
    from calib.data.sources import ManifestSource

    rows = []
    for i, lab in enumerate(["0", "90", "180", "270"]):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"path": f"{i}.png", "label": lab}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    src = ManifestSource(tmp_path / "m.jsonl", PreprocessSpec(), "image")
    assert src.classes == ["0", "180", "270", "90"] or src.classes == ["0", "90", "180", "270"]
    assert sorted(src.labels) == [0, 1, 2, 3]  # names, not the indices 0, 90, 180, 270


def test_11_unknown_exclude_hint_names_no_missing_command(tmp_path, mlp, capsys):
    model, data = mlp
    rc, _, err = run(capsys, "quantize", model, "--data", data, "-o", tmp_path / "q.onnx", "--exclude", "nope")
    assert rc == 2 and "calib inspect" not in err
    one_line(err)


def test_11_polygraphy_bound_matches_the_api_used():
    import inspect

    from polygraphy.backend.onnxrt import SessionFromOnnx

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"polygraphy>=0.53"' in text
    assert "graph_optimization_level" in inspect.signature(SessionFromOnnx.__init__).parameters

"""calib run's TOML config: every bad input gives one clear error naming the key."""

from pathlib import Path

import pytest

from calib.config import KEYS, RunConfig, keys_help, load_config, parse_config
from calib.errors import ConfigError


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "calib").mkdir()
    (tmp_path / "eval").mkdir()
    return tmp_path


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_minimal_config_resolves_paths_relative_to_the_file(files):
    cfg = load_config(_write(files, '[model]\npath = "m.onnx"\n[data]\ncalib = "calib"\n'))
    assert isinstance(cfg, RunConfig)
    assert cfg.model == files / "m.onnx"
    assert cfg.calib_data == files / "calib"
    assert cfg.store == files / "calib-runs"
    assert cfg.methods == ["entropy", "minmax", "percentile", "mse"]
    assert cfg.name == "m"


def test_unknown_key_names_it_and_suggests_the_closest(files):
    with pytest.raises(ConfigError) as e:
        load_config(_write(files, '[model]\npath = "m.onnx"\n[data]\ncalib = "calib"\nbatchsize = 4\n'))
    assert "unknown key 'data.batchsize'" in str(e.value)
    assert e.value.hint == "did you mean 'batch_size'?"


def test_unknown_section_suggests(files):
    with pytest.raises(ConfigError) as e:
        load_config(_write(files, '[modle]\npath = "m.onnx"\n'))
    assert "unknown section [modle]" in str(e.value) and "model" in e.value.hint


def test_wrong_type_is_named(files):
    with pytest.raises(ConfigError, match=r"'data.batch_size' must be int, got str"):
        load_config(_write(files, '[model]\npath = "m.onnx"\n[data]\ncalib = "calib"\nbatch_size = "8"\n'))


def test_missing_path_is_named(files):
    with pytest.raises(ConfigError, match=r"'data.calib' = 'nope'.*does not exist"):
        load_config(_write(files, '[model]\npath = "m.onnx"\n[data]\ncalib = "nope"\n'))


def test_required_key(files):
    with pytest.raises(ConfigError, match=r"'model.path' is required"):
        load_config(_write(files, '[data]\ncalib = "calib"\n'))


def test_bad_target_string(files):
    with pytest.raises(ConfigError, match=r"target.metric: .*cosine"):
        load_config(_write(files, '[model]\npath = "m.onnx"\n[data]\ncalib = "calib"\neval = "eval"\n'
                                  '[target]\nmetric = "cosine=0.99"\n'))


def test_unknown_method_and_best_without_eval(files):
    with pytest.raises(ConfigError, match=r"calibrate.methods: unknown calibration method 'entrpy'"):
        load_config(_write(files, '[model]\npath = "m.onnx"\n[data]\ncalib = "calib"\n'
                                  '[calibrate]\nmethods = ["entrpy"]\n'))
    with pytest.raises(ConfigError, match=r"need data.eval"):
        load_config(_write(files, '[model]\npath = "m.onnx"\n[data]\ncalib = "calib"\n'
                                  '[calibrate]\nprimary = "best"\n'))


def test_not_toml(files):
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        load_config(_write(files, "[model\n"))


def test_preprocess_section_is_validated_by_the_spec(files):
    cfg = load_config(_write(files, '[model]\npath = "m.onnx"\n[data]\ncalib = "calib"\n'
                                    '[preprocess]\nresize_short = 256\ncrop = [224, 224]\n'))
    assert cfg.preprocess["resize_short"] == 256 and cfg.preprocess["crop"] == [224, 224]
    with pytest.raises(ConfigError, match=r"layout"):
        load_config(_write(files, '[model]\npath = "m.onnx"\n[data]\ncalib = "calib"\n'
                                  '[preprocess]\nlayout = "CHWN"\n'))


def test_every_key_is_documented():
    text = keys_help()
    for sec, keys in KEYS.items():
        assert f"[{sec}]" in text
        for k, (_, _, doc) in keys.items():
            assert doc and f"  {k} (" in text


def test_parse_config_in_memory(files):
    cfg = parse_config({"model": {"path": "m.onnx"}, "data": {"calib": "calib", "eval": "eval"},
                        "calibrate": {"primary": "best"}, "target": {"metric": "top1:0.99"}}, base=files)
    assert cfg.primary == "best" and cfg.target == "top1:0.99" and cfg.eval_data == files / "eval"

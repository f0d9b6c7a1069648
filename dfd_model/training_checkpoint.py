"""Training checkpoints: everything a resumed run needs, in safetensors + JSON, never pickle.

A checkpoint is a folder `checkpoints/<stage>-<step>/` holding `tensors.safetensors` (model,
discriminator, optimiser moments, feature banks, RNG states) and `state.json` (stage, step,
configs, optimiser hyper-parameters, loss-scaler state, the sha256 of the tensors file and of
the state itself). It is written under a temporary name and renamed whole;
`checkpoints/latest.json`, written last, names it and its digest. A checkpoint that was being
written when the process died is therefore never named, and one whose bytes changed (either
file) is refused.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from dfd_data.atomic import WriteError, atomic_write_safetensors, atomic_write_text, sha256_bytes, sha256_file
from dfd_data.errors import UserError

from .projection import FeatureBank

FORMAT = "dfd-training-checkpoint"
FORMAT_VERSION = 2  # 2: state.json carries its own digest
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
LATEST = "latest.json"
KEEP = 2  # checkpoints kept on disk (the newest ones)
_CHECKPOINT_NAME = re.compile(r"stage(\d+)-step(\d+)")  # see checkpoint_name


class TrainingCheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed from; one line naming the file."""


def _flatten_optimizer(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{name}.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(name: str, optimizer: torch.optim.Optimizer, tensors, meta: dict) -> None:
    """Load optimiser `name`'s state from the open checkpoint `tensors` (a safetensors handle)."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state: dict[int, dict] = {}
    prefix = f"optimizer.{name}."
    for key in tensors.keys():
        if key.startswith(prefix):
            index, field = key[len(prefix):].split(".", 1)
            value = tensors.get_tensor(key)
            param = params[int(index)] if int(index) < len(params) else None
            if param is not None and field != "step" and value.shape == param.shape:
                # The CPU's fused Adam pairs a parameter's values with its moments' in memory
                # order, whatever their strides (CUDA's refuses mismatched layouts): each
                # moment takes its parameter's layout (channels-last convolution weights),
                # which the contiguous copy in the checkpoint lost. Read one at a time, so
                # resuming needs no second copy of every moment.
                value = torch.empty_like(param).copy_(value)
            else:
                value = value.clone()  # see load_checkpoint: nothing kept may view the file
            state.setdefault(int(index), {})[field] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    # The implementation is this run's choice, not the checkpoint's: older ones were unfused.
    groups = [{**saved, "fused": live.get("fused"), "foreach": live.get("foreach")}
              for saved, live in zip(meta["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run: Path, name: str, *, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], banks: FeatureBank | None, state: dict) -> Path:
    """Write checkpoint `name` under run/checkpoints and point latest.json at it."""
    folder = run / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        tensors.update({f"{prefix}.{key}": value for key, value in module.state_dict().items()})
    optimizer_meta = {}
    for prefix, optimizer in optimizers.items():
        flat, optimizer_meta[prefix] = _flatten_optimizer(prefix, optimizer)
        tensors.update(flat)
    if banks is not None:
        tensors.update({f"banks.{key}": value for key, value in banks.flat().items()})
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    temp, final = folder / f".tmp-{name}", folder / name
    shutil.rmtree(temp, ignore_errors=True)
    try:
        temp.mkdir()
    except OSError as error:  # (a full disk)
        raise WriteError.of(error, final) from None
    try:
        _, digest = atomic_write_safetensors(temp / TENSORS_FILE, tensors)
        document = {"format": FORMAT, "format_version": FORMAT_VERSION, "optimizers": optimizer_meta,
                    "tensors_sha256": digest, **state}
        document["state_sha256"] = _state_digest(document)
        atomic_write_text(temp / STATE_FILE, json.dumps(document, indent=1, sort_keys=True))
    except BaseException as error:  # a full disk: no half checkpoint stays behind to take space
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(error, WriteError):  # (named as the checkpoint's file, not the temporary folder's)
            raise WriteError.of(error, final / Path(error.filename).name) from None
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temp, final)
    atomic_write_text(folder / LATEST, json.dumps({"checkpoint": name, "tensors_sha256": document["tensors_sha256"]}))
    _prune(folder, keep=name)
    return final


def _state_digest(document: dict) -> str:
    """sha256 of state.json's contents other than this digest (JSON round trips exactly)."""
    return sha256_bytes(json.dumps({k: v for k, v in document.items() if k != "state_sha256"},
                                   sort_keys=True).encode())


def _prune(folder: Path, keep: str) -> None:
    olds = sorted((p for p in folder.iterdir() if p.is_dir() and p.name != keep and not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime)
    for path in olds[:max(0, len(olds) - (KEEP - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    for temp in folder.glob(".tmp-*"):
        shutil.rmtree(temp, ignore_errors=True)


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint folder latest.json names, or None when the run has none yet. Where
    latest.json is missing or names a folder that is gone (deleted by hand, say, being damaged),
    the newest checkpoint folder on disk, by stage and step."""
    folder = run / "checkpoints"
    pointer = folder / LATEST
    if pointer.is_file():
        try:
            name = json.loads(pointer.read_text())["checkpoint"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise TrainingCheckpointError(f"{pointer}: unreadable; delete it to resume from the newest checkpoint "
                                          "beside it") from None
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise TrainingCheckpointError(f"{pointer}: names an invalid checkpoint {name!r}")
        if (folder / name).is_dir():
            return folder / name
    found = [(int(match[1]), int(match[2]), path) for path in (folder.iterdir() if folder.is_dir() else ())
             if path.is_dir() and (match := _CHECKPOINT_NAME.fullmatch(path.name))]
    return max(found)[2] if found else None


def checkpoint_name(stage: int, step: int) -> str:
    return f"stage{stage}-step{step:07d}"


def checkpoint_configs(path: Path) -> tuple[dict, int]:
    """({"model": ..., "training": ...}, processes) as checkpoint `path` records them: a resumed
    run is checked against them where train_config.json was lost, and its batch per process
    may differ where its number of processes does."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        return ({"model": dict(state["model_config"]), "training": dict(state["train_config"])},
                int(state.get("processes", 1)))  # (checkpoints from before torchrun runs lack it)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise TrainingCheckpointError(f"{path / STATE_FILE}: unreadable, or records no configuration") from None


def load_checkpoint(path: Path, *, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], device: torch.device) -> tuple[dict, FeatureBank | None]:
    """Restore modules, optimisers and RNG from `path`; returns (state.json, banks or None)."""
    from safetensors import safe_open

    state_path, tensors_path = path / STATE_FILE, path / TENSORS_FILE
    if not state_path.is_file() or not tensors_path.is_file():
        raise TrainingCheckpointError(f"{path}: incomplete checkpoint (needs {STATE_FILE} and {TENSORS_FILE})")
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as error:
        raise TrainingCheckpointError(f"{state_path}: not valid JSON ({error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("format_version") != FORMAT_VERSION:
        raise TrainingCheckpointError(f"{state_path}: not a {FORMAT} version {FORMAT_VERSION} checkpoint")
    if _state_digest(state) != state.get("state_sha256"):
        raise TrainingCheckpointError(f"{state_path}: contents differ from the digest it records; "
                                      f"the checkpoint is damaged (delete {path} to resume from the one before)")
    if sha256_file(tensors_path) != state.get("tensors_sha256"):
        raise TrainingCheckpointError(f"{tensors_path}: contents differ from what {STATE_FILE} records; "
                                      f"the checkpoint is damaged (delete {path} to resume from the one before)")
    # Read tensor by tensor, so resuming holds no second copy of the run. The tensors read
    # view a memory map of the file: whatever is kept is copied, or one four-byte Adam step
    # would keep the whole file mapped (6.3 GiB for the full model) for the rest of the run,
    # and on disk after the checkpoint is pruned.
    with safe_open(str(tensors_path), "pt") as tensors:
        for prefix, module in modules.items():
            own = {key[len(prefix) + 1:]: tensors.get_tensor(key) for key in tensors.keys()
                   if key.startswith(prefix + ".")}
            try:
                module.load_state_dict(own, strict=True)
            except RuntimeError as error:
                raise TrainingCheckpointError(f"{tensors_path}: {prefix} does not match the run's architecture "
                                              f"({' '.join(str(error).split())[:200]})") from None
            del own
        for prefix, optimizer in optimizers.items():
            try:
                _restore_optimizer(prefix, optimizer, tensors, state["optimizers"][prefix])
            except ValueError as error:  # load_state_dict's word for groups of other sizes
                raise TrainingCheckpointError(f"{tensors_path}: the {prefix} optimiser does not match the run's "
                                              f"({' '.join(str(error).split())[:200]})") from None
        bank_tensors = {key[len("banks."):]: tensors.get_tensor(key).clone() for key in tensors.keys()
                        if key.startswith("banks.")}
        banks = FeatureBank.from_flat(bank_tensors).to(device) if bank_tensors else None
        torch.set_rng_state(tensors.get_tensor("rng.cpu"))
        cuda_states = [tensors.get_tensor(f"rng.cuda.{i}") for i in range(torch.cuda.device_count())
                       if f"rng.cuda.{i}" in tensors.keys()]
    if cuda_states and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return state, banks


__all__ = ["TrainingCheckpointError", "checkpoint_configs", "checkpoint_name", "latest_checkpoint", "load_checkpoint",
           "save_checkpoint"]

"""Atomic file writes and checksums.

Every output goes to a temporary file in the destination folder and is renamed into place,
so a reader (or a resumed run) never sees half of a file: it is either absent or complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .errors import UserError

TEMP_PREFIX = ".dfd-tmp-"


class WriteError(UserError, OSError):
    """An output that could not be written (disk full, no permission): one line naming the
    file the step meant to write, not the temporary file it was writing through."""

    def __str__(self) -> str:
        return f"{self.filename}: cannot write ({self.strerror})"

    @classmethod
    def of(cls, error: OSError, path) -> "WriteError":
        return cls(error.errno, error.strerror or str(error), str(path))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that `path` is never observed half-written; when the system
    refuses (disk full, no permission) the temporary file is removed and WriteError raised."""
    _atomic_write_chunks(Path(path), [data])


def _atomic_write_chunks(path: Path, chunks: Iterable[bytes]) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise WriteError.of(error, path) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_npy(path: str | os.PathLike, shape: tuple[int, ...], rows: Iterable[bytes]) -> str:
    """Write a uint8 .npy of `shape` from its rows' bytes, streamed (a stack can be larger than
    memory), as atomically as atomic_write_bytes; returns the file's sha256. Plain writes, not a
    memory map: a full disk is an error to report, where a memory map would die of SIGBUS."""
    path = Path(path)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    digest = hashlib.sha256(header.getvalue())

    def chunks():
        yield header.getvalue()
        for row in rows:
            digest.update(row)
            yield row

    _atomic_write_chunks(path, chunks())
    return digest.hexdigest()


# torch dtype name -> the safetensors format's name for it
SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def atomic_write_safetensors(path: str | os.PathLike, tensors: Mapping, metadata: dict[str, str] | None = None,
                             float_dtype=None) -> tuple[int, str]:
    """Write torch `tensors` to `path` in the safetensors format, one tensor at a time, as
    atomically as atomic_write_bytes; returns the file's (size in bytes, sha256).

    safetensors' own writers want every tensor contiguous on the CPU at once. For a
    training checkpoint of the full model that is a second copy of its 6.3 GiB (weights and
    Adam moments, channels-last), which ran a 24 GB machine out of memory; here one tensor
    at a time is copied. `float_dtype`, when given, is the dtype every floating tensor is
    stored in. The format keeps only text metadata: anything else is refused before the
    file is touched (written, it would replace a good file with one no reader opens)."""
    import torch

    if any(not isinstance(k, str) or not isinstance(v, str) for k, v in (metadata or {}).items()):
        raise TypeError(f"{path}: safetensors metadata must map text to text, got {metadata!r}"[:300])
    if "__metadata__" in tensors:
        raise TypeError(f"{path}: '__metadata__' is the safetensors header's own key, not a tensor name")

    def stored_dtype(value):
        return float_dtype if float_dtype is not None and value.is_floating_point() else value.dtype

    keys, entries, end = sorted(tensors), {}, 0
    for key in keys:
        value, dtype = tensors[key], stored_dtype(tensors[key])
        name = SAFETENSORS_DTYPES.get(str(dtype).removeprefix("torch."))
        if name is None:
            raise TypeError(f"{path}: {key} is {dtype}, which the safetensors format has no name for")
        size = value.numel() * dtype.itemsize
        entries[key] = {"dtype": name, "shape": list(value.shape), "data_offsets": [end, end + size]}
        end += size
    header = json.dumps({**({"__metadata__": metadata} if metadata else {}), **entries},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the tensors start 8-byte aligned, as safetensors writes them
    digest = hashlib.sha256()

    def chunks():
        for key in [None, *keys]:
            if key is None:
                chunk = struct.pack("<Q", len(header)) + header
            else:
                value = tensors[key].detach().to("cpu", stored_dtype(tensors[key]))
                chunk = value.contiguous().reshape(-1).view(torch.uint8).numpy()
            digest.update(chunk)
            yield chunk

    _atomic_write_chunks(Path(path), chunks())
    return 8 + len(header) + end, digest.hexdigest()


@contextlib.contextmanager
def all_or_none(root: str | os.PathLike):
    """Yields write(relpath, data), an atomic write under `root`. If the block fails, the files
    it wrote are deleted again: one item's outputs appear all together or not at all (a full
    disk on an item's third file must not leave its first two behind, recorded nowhere)."""
    written: list[Path] = []

    def write(relpath: str, data: bytes) -> None:
        path = Path(root, relpath)
        # (listed first: an interruption (Ctrl-C, a worker's parent gone) just after the file
        # lands had left it behind, unlisted)
        written.append(path)
        try:
            atomic_write_bytes(path, data)
        except Exception:  # the write itself failed: whatever is at `path` is not this block's
            written.pop()
            raise

    try:
        yield write
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise


def remove_stale_temp_files(folder: str | os.PathLike, recursive: bool = True) -> int:
    """Delete temporary files left by a killed run under `folder` (or, not `recursive`, in it
    alone); returns how many. Steps sweep their folders as they start and again as they end:
    when a worker process dies, its pool is torn down and the other workers die mid-write too
    (their files are done again, but their temporary files had stayed, and `verify` failed)."""
    removed = 0
    for root, dirs, files in os.walk(folder):
        for name in files:
            if name.startswith(TEMP_PREFIX):
                Path(root, name).unlink(missing_ok=True)
                removed += 1
        if not recursive:
            dirs.clear()
    return removed

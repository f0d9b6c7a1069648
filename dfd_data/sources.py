"""Finding the input photos in a folder and giving each a stable, file-system-safe id."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .dataset import MANIFEST_NAME
from .image_io import is_image_name


@dataclass(frozen=True)
class Source:
    path: Path  # the file as found (joined to the folder the user gave)
    relpath: str  # relative to that folder, with forward slashes
    id: str  # unique id used for every output derived from this photo


def list_sources(folder: str | os.PathLike, skip: str | os.PathLike | None = None) -> tuple[list[Source], int]:
    """Image files under `folder` (recursively, following directory links but never into a
    folder already seen, so a link loop cannot trap the walk, nor into a dataset folder: `skip`,
    the one being made, perhaps inside its own source folder, and any holding a manifest),
    sorted, with unique ids; also the count of other files."""
    folder = Path(folder)
    found, ignored = [], 0
    seen = {os.path.realpath(folder)} | ({os.path.realpath(skip)} if skip is not None else set())
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(os.path.join(dirpath, name))
            if real not in seen and not os.path.isfile(os.path.join(real, MANIFEST_NAME)):
                seen.add(real)
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            if is_image_name(name):
                found.append(Path(dirpath, name).relative_to(folder).as_posix())
            elif not name.startswith("."):
                ignored += 1
    found.sort()
    ids = unique_ids(found)
    return [Source(folder / rel, rel, ids[rel]) for rel in found], ignored


def nth_face_id(source_id: str, index: int) -> str:
    """The record id of a photo's face number `index` under --all-faces, and of its only record
    where it shows no face or failed (which had taken its bare id: x_f0.png's then replaced
    x.png's first face). Distinct sources' ids never meet: x_fI = y_fJ only where x = y."""
    return f"{source_id}_f{index}"


# An id names files with a suffix or two (id-1fa948f1_f12.png, sketches' id.png): a longer one had
# passed a file system's 255 bytes, and its photo failed on every run.
MAX_ID_BYTES = 200


def unique_ids(relpaths: list[str]) -> dict[str, str]:
    """Map relative paths to ids: the path without extension, '/' as '__', unsafe characters
    as '_', cut to MAX_ID_BYTES; clashes (a.jpg and a.png) get a short hash of the full path."""
    def base(rel: str) -> str:
        stem = rel.rsplit(".", 1)[0]
        name = re.sub(r"[^\w.\-]", "_", stem.replace("/", "__")).lstrip(".") or "image"
        return name.encode()[:MAX_ID_BYTES].decode(errors="ignore")  # (a cut character is dropped whole)

    def hashed(rel: str) -> str:
        return f"{base(rel)}-{hashlib.sha256(os.fsencode(rel)).hexdigest()[:8]}"

    counts: dict[str, int] = {}
    for rel in relpaths:
        counts[base(rel)] = counts.get(base(rel), 0) + 1
    return {rel: base(rel) if counts[base(rel)] == 1 else hashed(rel) for rel in relpaths}

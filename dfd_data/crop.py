"""`dfd-data crop-components`: cut the five components out of every aligned photo and sketch.

Per source folder (images/ or sketches/<method>/) it writes, under components/<source>/,
one PNG per component and image (to look at) and, per component, one stacked uint8 .npy
(N, S, S[, 3]) with ids.txt giving the row order (to memory-map; dfd-model train stacks its own).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .atomic import all_or_none, atomic_write_npy, atomic_write_text, remove_stale_temp_files, sha256_bytes
from .components import COMPONENTS, component_windows, crop_components
from .contact_sheet import contact_sheet
from .dataset import Dataset, DatasetError, read_jsonl, writes_dataset
from .derived import run_derived_step
from .image_io import decode_image, encode_png, read_bytes, read_image
from .runner import BatchSummary, Task
from .versions import tool_versions
from .worker_check import check_workers

STEP_PREFIX = "crop-components:"
PREVIEW_ROWS = 8


@dataclass(frozen=True)
class _Job:
    record_id: str
    input_relpath: str
    gray: bool
    resolution: int
    root: str
    out_dir: str  # components/<source>, relative to root
    # a sketch's: the digest of its aligned photo now, and of the photo it was drawn from
    photo_sha256: str | None = None
    drawn_from_sha256: str | None = None


def available_sources(dataset: Dataset) -> list[str]:
    """images plus every sketch set present, as folder paths relative to the dataset."""
    sources = ["images"]
    sketches = dataset.root / "sketches"
    if sketches.is_dir():
        sources += sorted(f"sketches/{p.name}" for p in sketches.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sources


def crop_one(task: Task) -> dict:
    """Worker: crop one aligned image or sketch and write its five component PNGs."""
    job: _Job = task.payload
    path = Path(job.root, job.input_relpath)
    if job.photo_sha256 is not None and job.drawn_from_sha256 != job.photo_sha256:
        # cropping it would pair the new photo's crops with crops of a sketch of the old one
        made = "was drawn from an older version of its photo" if job.drawn_from_sha256 else \
            "is not recorded by build-sketches (not sketched yet, or its run was stopped)"
        raise DatasetError(f"{path}: {made}; run build-sketches again")
    data = read_bytes(path)
    image = decode_image(data, path)
    if image.shape[:2] != (job.resolution, job.resolution):
        raise DatasetError(f"{path}: is {image.shape[1]}x{image.shape[0]}, expected {job.resolution}x{job.resolution} like the dataset")
    if job.gray:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    outputs = {}
    with all_or_none(job.root) as write:
        for name, crop in crop_components(image).items():
            relpath = f"{job.out_dir}/{name}/{job.record_id}.png"
            png = encode_png(crop)
            write(relpath, png)
            outputs[relpath] = sha256_bytes(png)
    return {"id": job.record_id, "input": job.input_relpath, "input_sha256": sha256_bytes(data), "outputs": outputs}


@writes_dataset("crop-components")
def crop_dataset(root: str | os.PathLike, sources: list[str] | None = None, *, jobs: int = 1,
                 backend: str = "loky", quiet: bool = False) -> list[BatchSummary]:
    dataset = Dataset(os.path.abspath(root))  # (absolute: a cluster worker's working directory is not this one's)
    manifest = dataset.require()
    resolution = manifest.get("resolution")
    aligned = dataset.aligned()
    if not aligned:
        raise DatasetError(f"{dataset.root}: has no aligned images to crop")
    known = available_sources(dataset)
    sources = list(dict.fromkeys(source.rstrip("/") for source in sources or []))  # (a shell completes sketches/canny/)
    for source in sources:
        if source not in known:
            raise DatasetError(f"{dataset.root}: no source folder {source!r} (available: {', '.join(known)})")
    check_workers(backend, "crop-components", writes=(dataset.root,))  # every machine of a cluster sees the dataset
    remove_stale_temp_files(dataset.root / "components")
    return [_crop_source(dataset, manifest, source, aligned, resolution, jobs, backend, quiet) for source in sources or known]


def _crop_source(dataset, manifest, source, aligned, resolution, jobs, backend, quiet) -> BatchSummary:
    step = STEP_PREFIX + source
    out_dir = f"components/{source}"
    gray = source != "images"
    wanted = {r["id"]: (r["image"] if not gray else f"{source}/{r['id']}.png") for r in aligned}
    photos = {r["id"]: r["outputs"][r["image"]] for r in aligned} if gray else {}
    drawn_from = {row["id"]: row.get("input_sha256") for row in read_jsonl(dataset.path(f"{source}/records.jsonl"))} \
        if gray else {}
    windows = {name: vars(window) for name, window in component_windows(resolution).items()}
    summary, ids = run_derived_step(
        dataset, step, out_dir, wanted, json.dumps(windows, sort_keys=True),
        lambda i, relpath: _Job(i, relpath, gray, resolution, str(dataset.root), out_dir, photos.get(i),
                                drawn_from.get(i)),
        crop_one, jobs=jobs, backend=backend, quiet=quiet, upstream=photos)
    files = _pack(dataset, out_dir, ids, gray, resolution)
    files.update(_write_preview(dataset, source, out_dir, ids[:PREVIEW_ROWS]))
    dataset.record_step(manifest, step, {
        "params": {"resolution": resolution, "windows": windows},
        "tools": tool_versions("numpy", "opencv"),
        "records": f"{out_dir}/records.jsonl",
        "files": files,
        "counts": {"cropped": len(ids), "failed": summary.failed},
    })
    return summary


def _pack(dataset: Dataset, out_dir: str, ids: list[str], gray: bool, resolution: int) -> dict[str, str]:
    """Stack each component's PNGs into one .npy in `ids` order, written atomically. With no
    ids, the stacks and ids.txt of an earlier run are deleted: they would list crops that are
    gone."""
    files = {}
    windows = component_windows(resolution)
    if not ids:
        for relpath in [f"{out_dir}/{name}.npy" for name in COMPONENTS] + [f"{out_dir}/ids.txt"]:
            dataset.path(relpath).unlink(missing_ok=True)
        return files
    for name in COMPONENTS:
        size = windows[name].size
        shape = (len(ids), size, size) if gray else (len(ids), size, size, 3)
        target = dataset.path(f"{out_dir}/{name}.npy")

        def rows(name=name):
            for record_id in ids:
                # (from its bytes: OpenCV's imread crashed on a path that is not valid UTF-8)
                data = read_bytes(dataset.path(f"{out_dir}/{name}/{record_id}.png"))
                image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
                yield (image if gray else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).tobytes()

        files[target.relative_to(dataset.root).as_posix()] = atomic_write_npy(target, shape, rows())
    ids_relpath = f"{out_dir}/ids.txt"
    text = "".join(f"{i}\n" for i in ids)
    atomic_write_text(dataset.path(ids_relpath), text)
    files[ids_relpath] = sha256_bytes(text.encode("utf-8"))
    return files


def _write_preview(dataset: Dataset, source: str, out_dir: str, ids: list[str]) -> dict[str, str]:
    tiles = [read_image(dataset.path(f"{out_dir}/{name}/{i}.png")) for i in ids for name in COMPONENTS]
    sheet = contact_sheet(tiles, thumb=128, columns=len(COMPONENTS)) if tiles else None
    return dataset.write_preview(f"components-{source.replace('/', '-')}", sheet)

"""`dfd-data build-sketches`: synthesise a training sketch for every aligned face.

Outputs go to sketches/<method id>/<image id>.png with records beside them; the method and
its parameters (and the checksums of any network weights) are recorded in the manifest.
Classical filters run one photo per task over all cores; methods with a network run in
this process on batches, the network itself using every core (or CUDA), except on a dask
or ray cluster, where every worker takes batches with its own copy of the network.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write_bytes, remove_stale_temp_files, sha256_bytes
from .cluster import CLUSTER_BACKENDS
from .contact_sheet import contact_sheet
from .dataset import Dataset, DatasetError, writes_dataset
from .derived import run_derived_step
from .image_io import decode_image, encode_png, read_bytes, read_image
from .runner import BatchSummary, Task
from .sketch_methods import SketchMethod, load_networks, run_method
from .versions import tool_versions
from .worker_check import check_workers

STEP_PREFIX = "build-sketches:"


@dataclass(frozen=True)
class _Job:
    record_id: str
    input_relpath: str
    root: str
    out_relpath: str
    method: SketchMethod
    device: str
    precision: str
    batch_size: int


def sketch_batch(tasks: list[Task]) -> list:
    """Worker: sketch a batch of aligned faces; a face that fails, fails alone."""
    jobs: list[_Job] = [task.payload for task in tasks]
    results: list = [None] * len(jobs)
    inputs = {}  # index -> (bytes, image)
    for index, job in enumerate(jobs):
        try:
            data = read_bytes(Path(job.root, job.input_relpath))
            inputs[index] = (data, decode_image(data, Path(job.root, job.input_relpath)))
        except Exception as error:  # reported for this face only
            results[index] = error
    if not inputs:
        return results
    method, device, precision, batch_size = jobs[0].method, jobs[0].device, jobs[0].precision, jobs[0].batch_size
    try:
        sketches = dict(zip(inputs, run_method(method, [image for _data, image in inputs.values()], device, batch_size,
                                               precision)))
    except Exception:  # find the face that broke the batch: run them one by one
        sketches = {}
        for index, (_data, image) in inputs.items():
            try:
                sketches[index] = run_method(method, [image], device, 1, precision)[0]
            except Exception as error:
                results[index] = error
    for index, sketch in sketches.items():
        job = jobs[index]
        try:
            png = encode_png(sketch)
            atomic_write_bytes(Path(job.root, job.out_relpath), png)
        except Exception as error:
            results[index] = error
            continue
        results[index] = {"id": job.record_id, "input": job.input_relpath, "input_sha256": sha256_bytes(inputs[index][0]),
                          "outputs": {job.out_relpath: sha256_bytes(png)}}
    return results


@writes_dataset("build-sketches")
def build_sketches(root: str | os.PathLike, method: SketchMethod, *, jobs: int = 1, backend: str = "loky",
                   device: str = "auto", precision: str = "auto", batch_size: int = 4, preview: int = 16,
                   quiet: bool = False) -> BatchSummary:
    dataset = Dataset(os.path.abspath(root))  # (absolute: a cluster worker's working directory is not this one's)
    manifest = dataset.require()
    aligned = dataset.aligned()
    if not aligned:
        raise DatasetError(f"{dataset.root}: has no aligned images to sketch")
    description = method.describe()
    # missing weights or device fail now, once, not per batch; workers get the resolved precision
    networks_precision = load_networks(method, device, precision)
    precision = networks_precision or "fp32"  # (filters alone: --precision means nothing to them)
    if networks_precision == "bf16":  # bf16 sketches differ from fp32 ones by rounding: switching redoes them
        description["precision"] = networks_precision
    out_dir = f"sketches/{method.id}"
    step = STEP_PREFIX + method.id
    # and on every machine of a cluster, before the step's folder is made
    check_workers(backend, step, functools.partial(load_networks, method, device, precision), writes=(dataset.root,))
    if dataset.path(out_dir).exists():
        remove_stale_temp_files(dataset.path(out_dir))
    inputs = {r["id"]: r["image"] for r in aligned}

    def payload(record_id: str, input_relpath: str) -> _Job:
        return _Job(record_id, input_relpath, str(dataset.root), f"{out_dir}/{record_id}.png", method, device,
                    precision, batch_size)

    if method.uses_network and backend not in CLUSTER_BACKENDS:  # one process; the network parallelises inside
        jobs, backend = 1, "threading"
    recipe = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    summary, ids = run_derived_step(dataset, step, out_dir, inputs, recipe, payload, sketch_batch, jobs=jobs,
                                    backend=backend, quiet=quiet, batch_size=batch_size if method.uses_network else 1)
    files = _write_preview(dataset, method, inputs, ids[:preview])  # (--preview 0 deletes an earlier sheet)
    dataset.record_step(manifest, step, {
        "params": description,
        # (the filters are OpenCV and NumPy alone: importing torch to name its version took 3 s)
        "tools": tool_versions("numpy", "opencv", *(("scikit-image", "torch") if method.uses_network else ())),
        "records": f"{out_dir}/records.jsonl",
        "files": files,
        "counts": {"sketched": len(ids), "failed": summary.failed},
    })
    return summary


def _write_preview(dataset: Dataset, method: SketchMethod, inputs: dict[str, str], ids: list[str]) -> dict[str, str]:
    """Contact sheet of (photo | sketch) pairs, four pairs a row."""
    tiles = []
    for record_id in ids:
        tiles += [read_image(dataset.path(inputs[record_id])), read_image(dataset.path(f"sketches/{method.id}/{record_id}.png"))]
    return dataset.write_preview(f"sketches-{method.id}", contact_sheet(tiles, thumb=256, columns=8) if tiles else None)

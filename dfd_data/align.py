"""`dfd-data align`: detect, landmark and FFHQ-align every face photo in a folder.

Each source photo becomes one record (or one per face with all_faces); photos without a
face and files that are not usable images are recorded and reported, never fatal. Rerunning
skips photos whose aligned images are present, unaltered, and made from the same bytes, and
photos of the same bytes that showed no face (they are reported again).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .atomic import all_or_none, remove_stale_temp_files, sha256_bytes, sha256_file
from .contact_sheet import contact_sheet
from .dataset import Dataset, DatasetError, RecordLog
from .faces import LANDMARK_MODEL_FILE, dlib_models, find_faces, package_model_path
from .ffhq_alignment import TEMPLATE_LEFT_EYE, TEMPLATE_MOUTH, TEMPLATE_RIGHT_EYE, align_face, ffhq_quad
from .image_io import IMAGE_EXTENSIONS, decode_image, encode_png, read_bytes, read_image
from .runner import BatchSummary, Outcome, SkipItem, Task, run_batch
from .sources import Source, list_sources, nth_face_id
from .versions import tool_versions
from .worker_check import check_workers

STEP = "align"
PREVIEW_COUNT = 64


@dataclass(frozen=True)
class AlignParams:
    size: int = 512
    all_faces: bool = False


@dataclass(frozen=True)
class _Job:
    source: Source
    params: AlignParams
    out_root: str


def _round_points(points: np.ndarray, digits: int = 2) -> list[list[float]]:
    return [[round(float(x), digits), round(float(y), digits)] for x, y in points]


def align_source(task: Task) -> list[dict]:
    """Worker: align the face(s) of one photo, write them, return their records."""
    job: _Job = task.payload
    source, params = job.source, job.params
    data = read_bytes(source.path)
    base = {"source": source.relpath, "source_sha256": sha256_bytes(data), "source_bytes": len(data),
            "params": asdict(params)}
    image = decode_image(data, source.path)
    faces = find_faces(image)
    if not faces:
        raise SkipItem(_no_face(source), [{"id": record_ids(source, params, 1)[0], **base, "status": "no_face"}])
    chosen = faces if params.all_faces else faces[:1]
    records = []
    ids = record_ids(source, params, len(chosen))
    with all_or_none(job.out_root) as write:
        for index, (face, face_id) in enumerate(zip(chosen, ids)):
            quad = ffhq_quad(face.landmarks)
            png = encode_png(align_face(image, quad, params.size))
            relpath = f"images/{face_id}.png"
            write(relpath, png)
            records.append({
                "id": face_id, **base, "status": "aligned", "face_index": index, "faces_found": len(faces),
                "image": relpath, "outputs": {relpath: sha256_bytes(png)},
                "detection": {"box": list(face.box), "score": round(face.score, 4), "upsample": face.upsample},
                "landmarks": _round_points(face.landmarks, 1), "quad": _round_points(quad, 3),
            })
    return records


def record_ids(source: Source, params: AlignParams, count: int) -> list[str]:
    """The ids of a photo's `count` records (its faces; else its one no-face or error record)."""
    return [nth_face_id(source.id, index) for index in range(count)] if params.all_faces else [source.id]


def _no_face(source: Source) -> str:
    return f"{source.path}: no face found"


def _is_complete(dataset: Dataset, records: list[dict], source: Source, params: dict) -> bool:
    """Aligned with `params`, or found without a face (detection gives the same answer for
    the same bytes), from the photo's present bytes, with every output present and unaltered,
    under the ids this version gives (a record taken by another photo's is missing).
    The parameters are checked per record because an interrupted first run leaves records
    but no manifest to compare them with."""
    no_face = len(records) == 1 and records[0].get("status") == "no_face"
    if not records or not (no_face or all(r.get("status") == "aligned" for r in records)):
        return False
    count = records[0].get("faces_found", len(records)) if params.get("all_faces") and not no_face else 1
    if [r.get("id") for r in records] != record_ids(source, AlignParams(**params), count):  # (ids of an older run)
        return False
    if any(r.get("params", params) != params for r in records):  # (records from before params were kept: the manifest's check)
        return False
    try:  # the size first: it rules out most changed photos without reading them
        if source.path.stat().st_size != records[0].get("source_bytes") \
                or sha256_file(source.path) != records[0].get("source_sha256"):
            return False
    except OSError:
        return False
    for record in records:
        for relpath, digest in record.get("outputs", {}).items():
            path = dataset.path(relpath)
            if not path.is_file() or sha256_file(path) != digest:
                return False
    return True


def align_folder(src: str | os.PathLike, dst: str | os.PathLike, params: AlignParams = AlignParams(), *,
                 jobs: int = 1, backend: str = "loky", quiet: bool = False) -> BatchSummary:
    # absolute paths: a cluster worker's working directory is not this one's
    src, dataset = Path(os.path.abspath(src)), Dataset(os.path.abspath(dst))
    if not src.is_dir():
        raise DatasetError(f"{src}: source folder does not exist")
    if os.path.realpath(src) == os.path.realpath(dataset.root):
        raise DatasetError(f"{dataset.root}: the dataset folder must not be the source folder; name a new one")
    if Path(os.path.realpath(src)).is_relative_to(os.path.realpath(dataset.root)):  # its images/ could be SRC itself
        raise DatasetError(f"{dataset.root}: the dataset folder must not hold the source folder {src} (aligned faces "
                           f"would be written among the photos); name a folder outside it")
    if params.size % 32 or params.size < 64:
        raise DatasetError(f"--size {params.size}: must be a multiple of 32 and at least 64")
    package_model_path(LANDMARK_MODEL_FILE)  # fail once, up front, rather than on every photo
    manifest = dataset.load_manifest()
    previous = manifest["steps"].get(STEP)
    if previous and previous.get("params") != asdict(params):
        before = previous.get("params") or {}
        options = f"--size {before.get('size')}" + (" --all-faces" if before.get("all_faces") else "")
        raise DatasetError(f"{dataset.root}: already aligned with {options}; pass them to go on with it, or use a new "
                           f"folder for --size {params.size}{' --all-faces' if params.all_faces else ''}")
    source_root = str(src.resolve())
    if manifest.get("sources") and manifest["sources"][0].get("path") != source_root:
        raise DatasetError(f"{dataset.root}: built from {manifest['sources'][0]['path']}, not {source_root}; use a new folder")

    sources, ignored = list_sources(src, skip=dataset.root)  # (DST inside SRC: its own images are not photos)
    if not sources:
        raise DatasetError(f"{src}: no image files found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    # on every machine of a cluster too, before any folder is made
    check_workers(backend, STEP, dlib_models, reads=(src,),
                  writes=(next(folder for folder in (dataset.root, *dataset.root.parents) if folder.is_dir()),))
    dataset.create()
    with dataset.writing("align"):
        return _align_sources(dataset, src, sources, ignored, params, jobs=jobs, backend=backend, quiet=quiet)


def _align_sources(dataset: Dataset, src: Path, sources: list[Source], ignored: int, params: AlignParams, *,
                   jobs: int, backend: str, quiet: bool) -> BatchSummary:
    """align_folder's work, holding the dataset's write lock (with the manifest read under it)."""
    manifest = dataset.load_manifest()
    source_root = str(src.resolve())
    remove_stale_temp_files(dataset.root)
    log = RecordLog(dataset.records_path)
    by_source: dict[str, list[dict]] = {}
    for record in log.by_id.values():
        by_source.setdefault(record["source"], []).append(record)
    known = {s.relpath for s in sources}
    for relpath in [r for r in by_source if r not in known]:  # photos removed from SRC
        _drop(dataset, log, by_source.pop(relpath))

    wanted = asdict(params)
    pending = [s for s in sources if not _is_complete(dataset, by_source.get(s.relpath, []), s, wanted)]
    tasks = [Task(s.relpath, str(s.path), _Job(s, params, str(dataset.root))) for s in pending]

    def on_outcome(outcome: Outcome) -> None:
        old = by_source.get(outcome.task.key, [])
        # labels follow the face (its index), whatever id an older run gave it
        attributes = {r.get("face_index", 0): r["attributes"] for r in old if r.get("attributes")}
        if outcome.status == "failed":
            source: Source = outcome.task.payload.source
            new = [{"id": record_ids(source, params, 1)[0], "source": source.relpath, "status": "error",
                    "reason": outcome.message}]
        else:
            new = outcome.result
        _drop(dataset, log, old, keep=new)
        for record in new:
            if record.get("status") == "aligned" and record["face_index"] in attributes:
                record["attributes"] = attributes[record["face_index"]]
            log.put(record)

    manifest["resolution"] = params.size
    manifest["sources"] = [{"path": source_root, "images": len(sources), "other_files_ignored": ignored}]
    with log:
        summary = run_batch(STEP, tasks, align_source, jobs=jobs, backend=backend, quiet=quiet,
                            already_done=len(sources) - len(pending), on_outcome=on_outcome)
    remove_stale_temp_files(dataset.root)  # (a pool torn down after a worker died killed others mid-write)
    dataset.remove_unrecorded_images("images", log.by_id.values())
    summary.not_images = ignored
    waiting = {task.key for task in tasks}
    summary.reports = sorted(summary.reports + [  # photos known to show no face are still reported
        {"step": STEP, "file": str(s.path), "status": "skipped", "reason": _no_face(s)}
        for s in sources if s.relpath not in waiting and by_source[s.relpath][0]["status"] == "no_face"],
        key=lambda report: report["file"])
    dataset.replace_errors(STEP, summary.reports)

    statuses = [r["status"] for r in log.by_id.values()]
    files = _write_preview(dataset)
    dataset.record_step(manifest, STEP, {
        "params": asdict(params),
        "tools": tool_versions("numpy", "opencv", "pillow", "dlib"),
        "records": dataset.records_path.name,
        "files": files,
        "counts": {status: statuses.count(status) for status in ("aligned", "no_face", "error")},
    })
    return summary


def _drop(dataset: Dataset, log: RecordLog, records: list[dict], keep: list[dict] = ()) -> None:
    """Forget `records`, and delete their outputs, except what the records in `keep` (their
    replacements) name: a photo aligned before and without a face now loses its image."""
    kept_ids = {record["id"] for record in keep}
    kept_outputs = {relpath for record in keep for relpath in record.get("outputs", {})}
    for record in records:
        for relpath in record.get("outputs", {}):
            if relpath not in kept_outputs:
                dataset.path(relpath).unlink(missing_ok=True)
        if record["id"] not in kept_ids:
            log.remove(record["id"])


def _write_preview(dataset: Dataset) -> dict[str, str]:
    """Contact sheet of the first aligned faces with the template eye and mouth positions."""
    faces = [read_image(dataset.path(r["image"])) for r in dataset.aligned()[:PREVIEW_COUNT]]
    marks = [TEMPLATE_LEFT_EYE, TEMPLATE_RIGHT_EYE, TEMPLATE_MOUTH]
    return dataset.write_preview("align", contact_sheet(faces, marks=marks) if faces else None)

"""The dataset folder: its layout, per-image records, the manifest and the error log.

Layout (see data_manifest.yaml at the repository root for the annotated schema):
    data_manifest.yaml   what was done: sources, steps with parameters and tool versions,
                         splits, counts, aggregate checksum
    records.jsonl        one line per aligned face (or per source that failed), sorted by id
    errors.jsonl         every file a step failed on or skipped, with the reason
    images/<id>.png      aligned faces
    sketches/<method>/   sketches per method (sketch-synthesis step)
    components/<source>/ component crops of images/ or of a sketch set
    previews/            contact sheets a person can look at
    .dfd-lock            held by the command writing the dataset (see Dataset.writing)

Every record that a step writes names its output files with their sha256 under "outputs",
so `verify` can re-check a dataset without knowing each step.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

try:
    import fcntl
except ImportError:  # (Windows: commands are not kept from writing one dataset at once there)
    fcntl = None

import yaml

from . import __version__
from .atomic import WriteError, atomic_write_bytes, atomic_write_text, remove_stale_temp_files, sha256_file
from .errors import UserError
from .image_io import encode_jpeg

FORMAT = "dfd-dataset"
FORMAT_VERSION = 1
MANIFEST_NAME = "data_manifest.yaml"
RECORDS_NAME = "records.jsonl"
ERRORS_NAME = "errors.jsonl"
# Held by the command writing the dataset (see Dataset.writing); it names that command.
LOCK_NAME = ".dfd-lock"
# Record ids name output files (images/<id>.png, sketches/<method>/<id>.png): only a plain
# file name is accepted, so that an edited records.jsonl cannot make a step write elsewhere.
SAFE_ID = re.compile(r"[\w\-][\w.\-]*")


class DatasetError(UserError):
    """A dataset folder that is missing, malformed or inconsistent (one-line message)."""


def read_jsonl(path: Path) -> list[dict]:
    """Read JSON lines; a torn last line (a run killed while appending) is dropped."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # only the unterminated last line may be torn
                break
            raise DatasetError(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def jsonl_text(rows: Iterable[dict]) -> str:
    """JSON lines in ASCII: a file name that is not valid UTF-8 (held by Python as lone
    surrogates) is written as escapes, which read back to the same name."""
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)


class RecordLog:
    """Records of one step, keyed by "id", appended as results arrive and sorted at the end."""

    def __init__(self, path: Path):
        self.path = path
        rows = read_jsonl(path)
        if any(not isinstance(row.get("id"), str) for row in rows):
            raise DatasetError(f"{path}: a record has no \"id\"")
        self.by_id = {row["id"]: row for row in rows}
        self._handle = None

    def __enter__(self) -> "RecordLog":
        self.rewrite()  # drops a torn line so appends start on a clean line
        self._handle = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        handle, self._handle = self._handle, None
        with contextlib.suppress(OSError):  # a failed append; rewrite() reports a disk still full
            handle.close()
        self.rewrite()

    def put(self, record: dict) -> None:
        self.by_id[record["id"]] = record
        if self._handle is not None:
            try:
                self._handle.write(jsonl_text([record]))
                self._handle.flush()
            except OSError as error:  # disk full: a torn line is dropped when the log is read again
                raise WriteError.of(error, self.path) from None

    def remove(self, record_id: str) -> None:
        self.by_id.pop(record_id, None)

    def rewrite(self) -> None:
        atomic_write_text(self.path, jsonl_text(self.by_id[key] for key in sorted(self.by_id)))


def safe_relpath(root: Path, relpath: str) -> Path:
    """The file `relpath` inside `root`; refuses paths that would leave the dataset."""
    candidate = Path(relpath)
    if candidate.is_absolute() or ".." in candidate.parts or not candidate.parts:
        raise DatasetError(f"{root}: path {relpath!r} in the dataset records escapes the dataset folder")
    return root / candidate


@dataclass
class VerifyReport:
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    altered: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.altered or self.added)


class Dataset:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def records_path(self) -> Path:
        return self.root / RECORDS_NAME

    @property
    def errors_path(self) -> Path:
        return self.root / ERRORS_NAME

    def path(self, relpath: str) -> Path:
        return safe_relpath(self.root, relpath)

    # -- manifest ---------------------------------------------------------------------------

    def load_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"format": FORMAT, "version": FORMAT_VERSION, "sources": [], "steps": {}}
        try:
            manifest = yaml.safe_load(self.manifest_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise DatasetError(f"{self.manifest_path}: not valid YAML ({' '.join(str(error).split())})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DatasetError(f"{self.manifest_path}: not a {FORMAT} manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise DatasetError(f"{self.manifest_path}: format version {manifest.get('version')} is not supported (expected {FORMAT_VERSION})")
        manifest.setdefault("steps", {})
        if not isinstance(manifest["steps"], dict) or not isinstance(manifest.get("sources", []), list):
            raise DatasetError(f"{self.manifest_path}: malformed (\"steps\" must be a mapping, \"sources\" a list)")
        return manifest

    def create(self) -> None:
        """Make the dataset folder (and its parents), or say in one line why it cannot be made."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as error:  # a file, or a dangling link, in the way
            raise DatasetError(f"{self.root}: cannot create the dataset folder ({error.strerror})") from None

    @contextlib.contextmanager
    def writing(self, command: str):
        """Hold the dataset's write lock while `command` changes it. A step reads the manifest
        when it starts and writes it when it ends: two at once (two sketch methods run from two
        terminals) lost the first one's record. Another command is refused in one line; the
        system drops the lock of a process that dies."""
        if fcntl is None:
            yield
            return
        path = self.root / LOCK_NAME
        try:
            handle = open(path, "a+", encoding="utf-8")
        except OSError as error:
            raise DatasetError(f"{path}: cannot open the dataset's lock file ({error.strerror})") from None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another command"
                raise DatasetError(f"{self.root}: {holder} is writing this dataset; run this command when it "
                                   "has finished") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"dfd-data {command} (pid {os.getpid()})\n")
            handle.flush()
            # a command killed while writing the manifest, records or a preview left its
            # temporary file: no other command can be writing one now (each step cleans its own folders)
            for folder, recursive in ((self.root, False), (self.root / "previews", True)):
                remove_stale_temp_files(folder, recursive)
            try:
                yield
            finally:  # emptied again: a finished dataset's files do not depend on which command ran last
                handle.truncate(0)

    def require(self) -> dict:
        """The manifest of an existing dataset, or a clear error if this is not one."""
        if not self.manifest_path.exists():
            raise DatasetError(f"{self.root}: not a dataset folder (no {MANIFEST_NAME}; create one with `dfd-data align`)")
        return self.load_manifest()

    def save_manifest(self, manifest: dict) -> None:
        """Write the manifest with counts, splits and the aggregate checksum brought up to date."""
        records = read_jsonl(self.records_path)
        aligned = [r for r in records if r.get("status") == "aligned"]
        manifest["created_by"] = f"deepfacedrawing-toolkit {__version__}"
        manifest["counts"] = {"images": len(aligned), "sources_failed": len(records) - len(aligned)}
        manifest["splits"] = _tally(r.get("attributes", {}).get("split", "unassigned") for r in aligned)
        manifest["attributes"] = {"gender": _tally(r.get("attributes", {}).get("gender", "unknown") for r in aligned)}
        manifest["checksum"] = "sha256:" + aggregate_checksum(self.tracked_files(manifest))
        ordered = {key: manifest[key] for key in ("format", "version", "created_by", "resolution", "sources",
                                                   "steps", "counts", "splits", "attributes", "checksum") if key in manifest}
        ordered.update({k: v for k, v in manifest.items() if k not in ordered})
        text = "# DeepFaceDrawing dataset manifest; schema documented in data_manifest.yaml of the toolkit.\n"
        atomic_write_text(self.manifest_path, text + yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True))

    def record_step(self, manifest: dict, name: str, entry: dict) -> None:
        """Put a step's entry (params, tools, records file, files, counts) into the manifest."""
        records = entry.get("records")
        if records:
            entry["records_sha256"] = sha256_file(self.path(records))
        manifest["steps"][name] = entry
        self.save_manifest(manifest)

    def write_preview(self, name: str, sheet) -> dict[str, str]:
        """Write a contact sheet as previews/<name>.jpg (sheet None: delete an earlier one, as
        a step left with nothing to show does); returns {relpath: sha256} for the step's files."""
        relpath = f"previews/{name}.jpg"
        if sheet is None:
            self.path(relpath).unlink(missing_ok=True)
            return {}
        data = encode_jpeg(sheet)
        atomic_write_bytes(self.path(relpath), data)
        return {relpath: hashlib.sha256(data).hexdigest()}

    # -- records and errors -----------------------------------------------------------------

    def records(self) -> list[dict]:
        rows = read_jsonl(self.records_path)
        for row in rows:
            if not isinstance(row.get("id"), str) or not SAFE_ID.fullmatch(row["id"]):
                raise DatasetError(f"{self.records_path}: record id {row.get('id')!r} is not a plain file name")
        return rows

    def aligned(self) -> list[dict]:
        """Records of aligned faces, sorted by id."""
        return [r for r in self.records() if r.get("status") == "aligned"]

    def remove_unrecorded_images(self, folder: str, records: Iterable[dict]) -> None:
        """Delete the PNGs under `folder` that none of `records` names in its outputs: those of an
        item whose run was stopped between writing and recording them, and whose input has gone
        since (an input still there is redone over them). They had stayed for good, and verify
        failed on them."""
        recorded = {relpath for record in records for relpath in record.get("outputs", {})}
        for dirpath, _dirnames, filenames in os.walk(self.path(folder)):
            for name in filenames:
                path = Path(dirpath, name)
                if name.endswith(".png") and path.relative_to(self.root).as_posix() not in recorded:
                    path.unlink(missing_ok=True)

    def replace_errors(self, step: str, reports: list[dict]) -> None:
        """Replace `step`'s lines in errors.jsonl by this run's reports; with none left the file
        goes, so that a run finished after a failed one leaves what an unbroken run leaves."""
        kept = [row for row in read_jsonl(self.errors_path) if row.get("step") != step]
        rows = kept + sorted(reports, key=lambda row: row["file"])
        if rows:
            atomic_write_text(self.errors_path, jsonl_text(rows))
        else:
            self.errors_path.unlink(missing_ok=True)

    # -- verification -----------------------------------------------------------------------

    def tracked_files(self, manifest: dict) -> dict[str, str]:
        """Every file the manifest vouches for, relative path -> sha256."""
        tracked: dict[str, str] = {}
        for step in manifest.get("steps", {}).values():
            records = step.get("records")
            if records:
                tracked[records] = step.get("records_sha256", "")
                for row in read_jsonl(self.path(records)):
                    tracked.update(row.get("outputs", {}))
            tracked.update(step.get("files", {}))
        return tracked

    def verify(self) -> VerifyReport:
        manifest = self.require()
        tracked = self.tracked_files(manifest)
        report = VerifyReport()
        for relpath in sorted(tracked):
            path = self.path(relpath)
            report.checked += 1
            if not path.is_file():
                report.missing.append(relpath)
            elif sha256_file(path) != tracked[relpath]:
                report.altered.append(relpath)
        if manifest.get("checksum") != "sha256:" + aggregate_checksum(tracked):
            report.altered.append(MANIFEST_NAME + " (aggregate checksum)")
        untracked_ok = {MANIFEST_NAME, ERRORS_NAME, LOCK_NAME}
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                relpath = Path(dirpath, name).relative_to(self.root).as_posix()
                if relpath not in tracked and relpath not in untracked_ok:
                    report.added.append(relpath)
        report.added.sort()
        return report


def writes_dataset(command: str) -> Callable:
    """Decorate a step taking the dataset's root first: it runs holding the write lock (see
    Dataset.writing). A folder that is no dataset is left alone: the step says so itself."""
    def decorate(step: Callable) -> Callable:
        @functools.wraps(step)
        def locked(root, *args, **kwargs):
            dataset = Dataset(os.path.abspath(root))
            if not dataset.manifest_path.is_file():
                return step(root, *args, **kwargs)
            with dataset.writing(command):
                return step(root, *args, **kwargs)
        return locked
    return decorate


def aggregate_checksum(tracked: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for relpath in sorted(tracked):
        digest.update(f"{relpath}\t{tracked[relpath]}\n".encode("utf-8"))
    return digest.hexdigest()


def _tally(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return dict(sorted(counts.items()))

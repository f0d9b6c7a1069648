"""`dfd-data label`: attach per-image attributes (gender, split, anything else) from CSV/JSON.

Rows are matched to aligned images by the first key column present (id, source, image,
image_name, file, filename, name, path), trying in turn the record id, the source path, the
source path without extension, the file name and the file name without extension. A key
that names photos in different folders (001.png in men/ and in women/), a row whose fields
outrun the header, and two rows that give one image different values are refused, naming
the row: a label file is a ground truth, and a guess would put wrong labels in the data.
Column names are matched without regard to case.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .dataset import Dataset, DatasetError, RecordLog, writes_dataset

KEY_COLUMNS = ("id", "source", "image", "image_name", "file", "filename", "name", "path")
GENDERS = {"female": "female", "f": "female", "woman": "female", "male": "male", "m": "male", "man": "male"}
SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
STEP = "label"


@dataclass
class LabelReport:
    rows: int
    labelled: int
    unmatched: list[str]


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(row number, row) pairs: a CSV/TSV line number (blank lines counted), a JSON entry's."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot read labels ({error})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}: not valid JSON ({error})") from None
        if isinstance(data, dict) and all(isinstance(value, dict) for value in data.values()):
            data = [{"id": key, **value} for key, value in data.items()]
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise DatasetError(f"{path}: expected a list of objects or an object of objects")
        return [(number, _known_names(row)) for number, row in enumerate(data, start=1)]
    if path.suffix.lower() in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        rows = []
        for row in reader:
            if None in row:
                raise DatasetError(f"{path}: row {reader.line_num}: more fields than the header names")
            rows.append((reader.line_num, _known_names(row)))
        return rows
    raise DatasetError(f"{path}: labels must be a .csv, .tsv or .json file")


def _known_names(row: dict) -> dict:
    """The row with the key and gender/split column names in lower case ("Gender" is gender)."""
    known = (*KEY_COLUMNS, "gender", "split")
    names = {name: str(name).strip() for name in row}
    return {names[name].lower() if names[name].lower() in known else names[name]: value for name, value in row.items()}


def _normalise(path: Path, line: int, attributes: dict) -> dict:
    clean = {}
    for name, value in attributes.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if name == "gender":
            if str(value).strip().lower() not in GENDERS:
                raise DatasetError(f"{path}: row {line}: gender {value!r} is not one of female, male")
            value = GENDERS[str(value).strip().lower()]
        elif name == "split":
            if str(value).strip().lower() not in SPLITS:
                raise DatasetError(f"{path}: row {line}: split {value!r} is not one of train, val, test")
            value = SPLITS[str(value).strip().lower()]
        elif isinstance(value, str):
            value = value.strip()
        clean[name] = value
    return clean


def _match_levels(records: list[dict]) -> list[dict[str, list[str]]]:
    """Lookup tables from the most to the least specific way of naming an image."""
    def stem(path: str) -> str:
        return path.rsplit(".", 1)[0]

    keyers = (lambda r: r["id"], lambda r: r["source"], lambda r: stem(r["source"]),
              lambda r: r["source"].rsplit("/", 1)[-1], lambda r: stem(r["source"].rsplit("/", 1)[-1]))
    levels = []
    for keyer in keyers:
        table: dict[str, list[str]] = {}
        for record in records:
            table.setdefault(keyer(record), []).append(record["id"])
        levels.append(table)
    return levels


@writes_dataset("label")
def apply_labels(root: str | os.PathLike, labels_file: str | os.PathLike) -> LabelReport:
    dataset, path = Dataset(root), Path(labels_file)
    manifest = dataset.require()
    rows = _read_rows(path)
    if not rows:
        raise DatasetError(f"{path}: no rows")
    key_column = next((c for c in KEY_COLUMNS if c in rows[0][1]), None)
    if key_column is None:
        raise DatasetError(f"{path}: no key column; name one of {', '.join(KEY_COLUMNS)}")
    log = RecordLog(dataset.records_path)
    levels = _match_levels([r for r in log.by_id.values() if r.get("status") == "aligned"])
    labelled, unmatched = set(), []
    given: dict[tuple[str, str], tuple[int, object]] = {}  # (image id, attribute) -> (row, value)
    for line, row in rows:
        key = str(row.get(key_column, "")).strip()
        ids = next((table[key] for table in levels if key in table), None)
        if not ids:
            unmatched.append(key)
            continue
        sources = sorted({log.by_id[record_id]["source"] for record_id in ids})
        if len(sources) > 1:
            raise DatasetError(f"{path}: row {line}: {key!r} names {len(sources)} photos ({', '.join(sources[:3])}); "
                               "key the row by source path or id")
        attributes = _normalise(path, line, {k: v for k, v in row.items() if k != key_column})
        for record_id in ids:
            for name, value in attributes.items():
                earlier = given.setdefault((record_id, name), (line, value))
                if earlier[1] != value:
                    raise DatasetError(f"{path}: row {line}: {name} {value!r} for {record_id}, where row {earlier[0]} "
                                       f"gave {earlier[1]!r}")
            record = log.by_id[record_id]
            record["attributes"] = {**record.get("attributes", {}), **attributes}
            labelled.add(record_id)
    if rows and not labelled:  # a file for another dataset, or keyed by something else: keep the labels there are
        raise DatasetError(f"{path}: none of its {len(rows)} rows matched an image of {dataset.root} "
                           f"(first: {unmatched[0]!r}); nothing was changed")
    log.rewrite()
    manifest["steps"][STEP] = {"params": {"file": str(path.resolve())},
                               "counts": {"rows": len(rows), "labelled_images": len(labelled), "unmatched_rows": len(unmatched)}}
    dataset.record_step(manifest, "align", manifest["steps"]["align"])  # records changed: new checksum
    return LabelReport(len(rows), len(labelled), unmatched)

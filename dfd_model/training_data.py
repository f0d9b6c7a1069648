"""(sketch, photo) training pairs read from a `dfd-data` dataset, at the training resolution.

The pairs are decoded once, resized to the model's resolution and stacked into two uint8
.npy files in the run folder (memory-mapped, so a 30K-face set at 512 px does not have to
fit in RAM); a fingerprint of the inputs lets a resumed run reuse them. A file that cannot be
read is reported on one line and left out; it never stops the others.

Batches are a pure function of (seed, stage, step): sample position p = step * batch + j falls in
epoch p // N, whose order is a permutation drawn from a generator seeded with (seed, stage, epoch).
A resumed run therefore sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from dfd_data.atomic import atomic_write_text
from dfd_data.dataset import Dataset, DatasetError, read_jsonl
from dfd_data.image_io import ImageError, read_image
from dfd_data.errors import UserError

DEFAULT_SKETCHES = "photocopy+simplify"
# Splits kept out of training: their faces serve the fixed validation grids.
HELD_OUT_SPLITS = ("val", "test")
UNKNOWN_GENDER = "all"
STAMP_FILE = "fingerprint.json"  # beside the stacked pairs: the rows they came from


class TrainingDataError(UserError):
    """A dataset that cannot be trained on; the message is one line."""


@dataclass
class PairSet:
    """Stacked pairs: sketches uint8 [N, R, R] (255 paper), photos uint8 [N, R, R, 3] (RGB)."""

    ids: list[str]
    genders: list[str]
    sketches: np.ndarray
    photos: np.ndarray
    fingerprint: str  # of the rows they were stacked from (checkpoints record what they trained on)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(sketches float [B, 1, R, R], photos float [B, 3, R, R]), both in [-1, 1]."""
        rows = np.asarray(indices)
        sketch = torch.from_numpy(np.ascontiguousarray(self.sketches[rows])).float()[:, None]
        photo = torch.from_numpy(np.ascontiguousarray(self.photos[rows])).permute(0, 3, 1, 2).float()
        return (sketch - 127.5) / 127.5, (photo - 127.5) / 127.5


def choose_sketch_folder(dataset: Dataset, wanted: str | None) -> str:
    """The sketch set to train on: `wanted`, else photocopy+simplify, else the only one."""
    folder = dataset.path("sketches")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if folder.is_dir() else []
    if not found:
        raise TrainingDataError(f"{dataset.root}: has no sketches; make them with `dfd-data build-sketches "
                                f"{dataset.root}`")
    if wanted is not None:
        if wanted not in found:
            raise TrainingDataError(f"{dataset.root}: no sketch set {wanted!r} (available: {', '.join(found)})")
        return wanted
    if DEFAULT_SKETCHES in found:
        return DEFAULT_SKETCHES
    if len(found) == 1:
        return found[0]
    raise TrainingDataError(f"{dataset.root}: holds several sketch sets ({', '.join(found)}); choose one with --sketches")


def split_records(dataset: Dataset, sketch_folder: str) -> tuple[list[dict], list[dict], int]:
    """(training, held-out) aligned records that have a finished sketch in `sketch_folder`,
    each with "sketch" and "gender" filled in, sorted by id; and how many aligned records
    have none."""
    done = {row.get("id"): row for row in read_jsonl(dataset.path(f"sketches/{sketch_folder}/records.jsonl"))}
    train, held_out, unsketched = [], [], 0
    for record in dataset.aligned():
        sketch = done.get(record["id"])
        if not sketch or not sketch.get("outputs"):
            unsketched += 1
            continue
        attributes = record.get("attributes", {})
        row = {"id": record["id"], "image": record["image"], "sketch": next(iter(sketch["outputs"])),
               "digests": [*record.get("outputs", {}).values(), *sketch["outputs"].values()],
               "gender": attributes.get("gender", UNKNOWN_GENDER)}
        (held_out if attributes.get("split") in HELD_OUT_SPLITS else train).append(row)
    return sorted(train, key=lambda r: r["id"]), sorted(held_out, key=lambda r: r["id"]), unsketched


def pairs_fingerprint(rows: list[dict], resolution: int) -> str:
    """Names the training pairs (ids, files, digests, genders) at `resolution`."""
    text = json.dumps([resolution, [(r["id"], r["image"], r["sketch"], r["digests"], r["gender"]) for r in rows]])
    return hashlib.sha256(text.encode()).hexdigest()


def load_pair(dataset: Dataset, row: dict, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(gray sketch [R, R], RGB photo [R, R, 3]) of one record, resized with area averaging."""
    pair = []
    for key in ("sketch", "image"):
        path = dataset.path(row[key])
        image = read_image(path)
        if image.shape[0] != image.shape[1]:
            raise ImageError(path, f"is {image.shape[1]}x{image.shape[0]}, not square like an aligned face")
        if image.shape[0] != resolution:
            image = cv2.resize(image, (resolution, resolution), interpolation=cv2.INTER_AREA)
        pair.append(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if key == "sketch" else image)
    return pair[0], pair[1]


def build_pair_set(dataset: Dataset, rows: list[dict], resolution: int, cache: Path, progress) -> tuple[PairSet, list[str]]:
    """Stack `rows` into `cache`/{sketches,photos}.npy (reused when its fingerprint matches).

    Returns the pairs and one error line per file that could not be used."""
    fingerprint = pairs_fingerprint(rows, resolution)
    stamp = cache / STAMP_FILE
    cached = _cached_pairs(cache, fingerprint, resolution)  # (None when there is none yet: an OSError)
    if cached is not None:
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    shape = (len(rows), resolution, resolution)
    sketches = np.lib.format.open_memmap(cache / ".tmp-sketches.npy", mode="w+", dtype=np.uint8, shape=shape)
    photos = np.lib.format.open_memmap(cache / ".tmp-photos.npy", mode="w+", dtype=np.uint8, shape=(*shape, 3))
    kept, errors = [], []
    for row in progress(rows):
        try:
            sketch, photo = load_pair(dataset, row, resolution)
        except (ImageError, DatasetError) as error:
            errors.append(str(error))
            continue
        sketches[len(kept)], photos[len(kept)] = sketch, photo
        kept.append(row)
    if not kept:
        raise TrainingDataError(f"{dataset.root}: none of the {len(rows)} training pairs could be read "
                                f"(first problem: {errors[0] if errors else 'none'})")
    for name, array in (("sketches", sketches), ("photos", photos)):
        array.flush()
        del array
        _truncate_rows(cache / f".tmp-{name}.npy", len(kept), cache / f"{name}.npy")
    ids, genders = [r["id"] for r in kept], [r["gender"] for r in kept]
    atomic_write_text(stamp, json.dumps({"fingerprint": fingerprint, "ids": ids, "genders": genders,
                                         "errors": errors}))
    return PairSet(ids, genders, np.load(cache / "sketches.npy", mmap_mode="r"),
                   np.load(cache / "photos.npy", mmap_mode="r"), fingerprint), errors


def _cached_pairs(cache: Path, fingerprint: str, resolution: int) -> tuple[PairSet, list[str]] | None:
    """The pairs stacked earlier from the same rows, or None where the cache is from other rows
    or damaged (a disk problem, a file edited): it is only a cache, and is built again."""
    try:
        saved = json.loads((cache / STAMP_FILE).read_text())
        if saved["fingerprint"] != fingerprint:
            return None
        ids, genders, errors = list(saved["ids"]), list(saved["genders"]), list(saved["errors"])
        sketches = np.load(cache / "sketches.npy", mmap_mode="r")
        photos = np.load(cache / "photos.npy", mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError):  # (JSONDecodeError and numpy's format errors are ValueErrors)
        return None
    shape = (len(ids), resolution, resolution)
    if sketches.shape != shape or photos.shape != (*shape, 3) or len(genders) != len(ids) \
            or sketches.dtype != np.uint8 or photos.dtype != np.uint8:
        return None
    return PairSet(ids, genders, sketches, photos, fingerprint), errors


def _truncate_rows(temp: Path, rows: int, target: Path) -> None:
    """Keep the first `rows` rows of a stacked .npy (unreadable files left a tail unused)."""
    full = np.load(temp, mmap_mode="r")
    if full.shape[0] == rows:
        del full
        os.replace(temp, target)
        return
    part = np.lib.format.open_memmap(temp.with_name(temp.name + ".part"), mode="w+", dtype=full.dtype,
                                     shape=(rows, *full.shape[1:]))
    part[:] = full[:rows]
    part.flush()
    del part, full
    os.replace(temp.with_name(temp.name + ".part"), target)
    temp.unlink()


class BatchOrder:
    """Which rows make up the batch of each step (see the module docstring)."""

    def __init__(self, size: int, batch_size: int, seed: int, stream: int = 0):
        """`stream` separates independent orders drawn from one seed (one per training stage)."""
        self.size, self.batch_size, self.seed, self.stream = size, batch_size, seed, stream
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(hash((self.seed, self.stream, epoch)) & (2 ** 62 - 1))
            self._orders = {epoch: torch.randperm(self.size, generator=generator)}  # keep one epoch
        return self._orders[epoch]

    def rows(self, step: int) -> list[int]:
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [int(self._order(p // self.size)[p % self.size]) for p in positions]


__all__ = ["BatchOrder", "DEFAULT_SKETCHES", "PairSet", "TrainingDataError", "build_pair_set",
           "choose_sketch_folder", "load_pair", "pairs_fingerprint", "split_records"]

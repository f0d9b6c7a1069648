"""`dfd-model evaluate`: how good is a trained model on (sketch, photo) pairs?

The metrics, one sentence each (also printed with the table):
- detection_rate: the share of generated faces in which dlib's HOG detector finds a face.
- landmark_error: mean distance between the 68 dlib landmarks of each generated face and of
  its input sketch, divided by the sketch's inter-ocular distance (between the eye centres);
  pairs where either has no detectable face are left out and counted.
- sketch_f_score: line F-score (ink within `tol` px) between each input sketch and a sketch
  re-drawn from its generated face with a dfd-data sketch method (default photocopy).
- frechet_distance: Frechet distance between the Gaussians fitted to the 128-d dlib face
  recognition ResNet embeddings of the generated faces and of the real photos (lower is
  closer; dlib's same-person threshold between two embeddings is a distance of 0.6).

Pairs are read from DIR/sketches/<name>.* and DIR/photos/<name>.* (same stem), both aligned
like training faces; both are brought to the model's resolution the same way (a non-square
one is letterboxed on white, not stretched).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from dfd_data.atomic import atomic_write_bytes, atomic_write_text
from dfd_data.contact_sheet import contact_sheet
from dfd_data.devices import precision_name
from dfd_data.errors import UserError
from dfd_data.faces import find_faces, package_model_path
from dfd_data.image_io import encode_jpeg, is_image_name, read_image
from dfd_data.line_metrics import line_f_score

from .generate import letterbox, load_sketch
from .networks import denormalize_image
from .sketch_to_face import SketchToFace

RECOGNITION_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
METRICS = {
    "detection_rate": "share of generated faces in which dlib's HOG detector finds a face (higher is better)",
    "landmark_error": "mean distance of the 68 landmarks of generated face vs input sketch, over the sketch's "
                      "inter-ocular distance (lower is better)",
    "sketch_f_score": "line F-score between each input sketch and a sketch re-drawn from its face (higher is better)",
    "frechet_distance": "Frechet distance of generated vs real faces in dlib's 128-d face embedding "
                        "(lower is better)",
}
# The embedding's landmarks are fitted inside this fixed box (fractions of the side) of an
# aligned face, so every image gets an embedding even when detection fails.
FACE_BOX = (0.2, 0.25, 0.8, 0.85)
GRID_ROWS = 16


class EvaluateError(UserError):
    """Pairs that cannot be evaluated; one line."""


# ---- the metrics --------------------------------------------------------------------------------
def inter_ocular(points: np.ndarray) -> float:
    """Distance between the eye centres (mean of points 36-41 and 42-47) of 68 landmarks."""
    return float(np.linalg.norm(points[36:42].mean(0) - points[42:48].mean(0)))


def landmark_error(points: np.ndarray, reference: np.ndarray) -> float:
    """Mean point distance between two (68, 2) landmark sets, over the reference's inter-ocular distance."""
    if points.shape != (68, 2) or reference.shape != (68, 2):
        raise ValueError(f"landmark sets must be (68, 2), got {points.shape} and {reference.shape}")
    scale = inter_ocular(reference)
    if scale <= 0:
        raise ValueError("the reference landmarks have coincident eyes")
    return float(np.linalg.norm(points - reference, axis=1).mean() / scale)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (rounding's negative eigenvalues as 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of a [N, D] and b [M, D].

    Tr sqrt(A B) is computed as Tr sqrt(sqrt(A) B sqrt(A)), a symmetric PSD matrix, so that
    the singular covariances of fewer than D+1 faces (every small evaluation: D is 128) give
    an exact answer instead of a general matrix square root's warning and complex rounding."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two [N>=2, D] sets with the same D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_root = float(np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum())
    value = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)
    return max(value, 0.0)


@functools.lru_cache(maxsize=1)
def _recognition_models():
    import dlib

    from dfd_data.faces import LANDMARK_MODEL_FILE

    return (dlib, dlib.shape_predictor(str(package_model_path(LANDMARK_MODEL_FILE))),
            dlib.face_recognition_model_v1(str(package_model_path(RECOGNITION_MODEL_FILE))))


def face_embedding(image: np.ndarray) -> np.ndarray:
    """dlib's 128-d face descriptor of an aligned RGB face (landmarks fitted in FACE_BOX)."""
    dlib, predictor, recognition = _recognition_models()
    height, width = image.shape[:2]
    left, top, right, bottom = FACE_BOX
    box = dlib.rectangle(int(left * width), int(top * height), int(right * width), int(bottom * height))
    image = np.ascontiguousarray(image)
    return np.asarray(recognition.compute_face_descriptor(image, predictor(image, box)), dtype=np.float64)


def landmarks_of(image: np.ndarray) -> np.ndarray | None:
    """68 landmarks of the largest face in an RGB or gray image, or None."""
    rgb = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    faces = find_faces(rgb)
    return faces[0].landmarks if faces else None


# ---- pairs and the run ------------------------------------------------------------------------------
def find_pairs(folder: str | os.PathLike) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(name, sketch, photo) for every stem present in both DIR/sketches and DIR/photos, and one
    line for each name left out: one side holds two images of it (a.png and a.jpg: which one
    was meant cannot be told), or the other side none."""
    folder = Path(folder)
    sides, ambiguous = {}, {}
    for side in ("sketches", "photos"):
        path = folder / side
        if not path.is_dir():
            raise EvaluateError(f"{folder}: needs a {side}/ folder (pairs are sketches/<name>.* with photos/<name>.*)")
        files: dict[str, list[Path]] = {}
        for entry in sorted(path.iterdir()):
            if not entry.is_dir() and is_image_name(entry.name):
                files.setdefault(entry.stem, []).append(entry)
        sides[side] = {stem: paths[0] for stem, paths in files.items()}
        for stem, paths in files.items():
            if len(paths) > 1:
                ambiguous.setdefault(stem, []).append(f"{', '.join(map(str, paths))}: {len(paths)} images named "
                                                      f"{stem!r}; keep one")
    names = sorted(set(sides["sketches"]) & set(sides["photos"]))
    if not names:
        raise EvaluateError(f"{folder}: no file name appears in both sketches/ and photos/")
    pairs = [(name, sides["sketches"][name], sides["photos"][name]) for name in names if name not in ambiguous]
    left_out = ["; ".join(ambiguous[name]) for name in names if name in ambiguous]
    for side, other, wanted in (("sketches", "photos", "photo"), ("photos", "sketches", "sketch")):
        left_out += [f"{sides[side][stem]}: no {wanted} named {stem!r} in {folder / other}"
                     for stem in sorted(set(sides[side]) - set(sides[other]))]
    return pairs, left_out


@dataclass
class Evaluation:
    metrics: dict[str, float | None]
    counts: dict[str, int]
    per_pair: list[dict]
    skipped: list[str]  # one line per pair left out: the unreadable or ambiguous file(s) and why

    def table(self) -> str:
        lines = [f"{'metric':<18} {'value':>9}  meaning"]
        for name, meaning in METRICS.items():
            value = self.metrics[name]
            lines.append(f"{name:<18} {'n/a' if value is None else f'{value:9.4f}':>9}  {meaning}")
        lines.append(", ".join(f"{k}: {v}" for k, v in self.counts.items()))
        return "\n".join(lines)


def evaluate(model: SketchToFace, pairs_dir: str | os.PathLike, out: str | os.PathLike, *, refine: float = 1.0,
             gender: str | None = None, sketch_method: str = "photocopy", tol: float = 2.0, batch_size: int = 4,
             quiet: bool = False) -> Evaluation:
    """Generate a face per pair, score it (module docstring), and write OUT/metrics.json,
    OUT/grid.jpg (sketch | face | photo) and OUT/faces/<name>.png."""
    from dfd_data.image_io import encode_png
    from dfd_data.sketch_methods import resolve_method, run_method

    out = Path(out)
    for side in ("sketches", "photos"):  # the grid and faces written there would replace or join the inputs
        inputs = os.path.realpath(Path(pairs_dir, side))
        for written in (out, out / "faces"):  # (faces/ may be a link into the inputs)
            if os.path.commonpath([inputs, os.path.realpath(written)]) == inputs:
                raise EvaluateError(f"--out {out}: {written} lies in the pairs' {side}/ folder; choose another "
                                    "output folder")
    resolution = model.config.resolution
    method = resolve_method(sketch_method)
    found, left_out = find_pairs(pairs_dir)
    pairs, skipped = [], list(left_out)
    for name, sketch_path, photo_path in found:
        try:
            photo = letterbox(read_image(photo_path), resolution)  # as its sketch is: side by side, they match
            pairs.append((name, load_sketch(sketch_path, resolution,
                                            photo_hint="a pair's sketch must be a drawing, not a photo"), photo))
        except UserError as error:
            skipped.append(str(error))
    if len(pairs) < 2:
        raise EvaluateError(f"{pairs_dir}: {len(pairs)} readable pair(s); evaluation needs at least 2"
                            + (f" ({skipped[0]})" if skipped else ""))
    (out / "faces").mkdir(parents=True, exist_ok=True)
    rows, fakes, reals, tiles = [], [], [], []
    starts = range(0, len(pairs), batch_size)
    for start in (starts if quiet else tqdm(starts, desc="evaluate", unit="batch")):
        chunk = pairs[start:start + batch_size]
        with torch.inference_mode():
            faces = denormalize_image(model(torch.from_numpy(np.stack([s for _, s, _ in chunk])), refine, gender))
        faces = faces.permute(0, 2, 3, 1).cpu().numpy()
        redrawn = run_method(method, list(faces), device=next(model.parameters()).device.type,
                             precision=precision_name(model.compute_dtype))
        for (name, sketch, photo), face, again in zip(chunk, faces, redrawn):
            atomic_write_bytes(out / "faces" / f"{name}.png", encode_png(face))
            face_points, sketch_points = landmarks_of(face), landmarks_of(sketch)
            row = {"name": name, "face_detected": face_points is not None,
                   "sketch_f_score": line_f_score(again, sketch, tol=tol)}
            if face_points is not None and sketch_points is not None:
                row["landmark_error"] = landmark_error(face_points, sketch_points)
            rows.append(row)
            fakes.append(face_embedding(face))
            reals.append(face_embedding(photo))
            if len(tiles) < 3 * GRID_ROWS:
                tiles += [sketch, face, photo]
    errors = [row["landmark_error"] for row in rows if "landmark_error" in row]
    metrics = {
        "detection_rate": float(np.mean([row["face_detected"] for row in rows])),
        "landmark_error": float(np.mean(errors)) if errors else None,
        "sketch_f_score": float(np.mean([row["sketch_f_score"] for row in rows])),
        "frechet_distance": frechet_distance(np.stack(fakes), np.stack(reals)),
    }
    counts = {"pairs": len(rows), "unreadable": len(skipped) - len(left_out), "left_out": len(left_out),
              "landmark_pairs": len(errors)}
    result = Evaluation(metrics, counts, rows, skipped)
    atomic_write_text(out / "metrics.json", json.dumps({
        "metrics": metrics, "meaning": METRICS, "counts": counts, "skipped": skipped,
        "settings": {"refine": refine, "gender": gender, "sketch_method": sketch_method, "tol": tol},
        "pairs": rows}, indent=2) + "\n")
    atomic_write_bytes(out / "grid.jpg", encode_jpeg(contact_sheet(tiles, thumb=min(256, resolution), columns=6)))
    return result


__all__ = ["Evaluation", "EvaluateError", "METRICS", "evaluate", "face_embedding", "find_pairs",
           "frechet_distance", "inter_ocular", "landmark_error", "landmarks_of"]

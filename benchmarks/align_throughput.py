"""Face-alignment throughput on real photos, per process, against the Pillow FFHQ recipe.

`dfd-data align` runs one single-threaded pipeline per worker process, so its speed is the
images/second of one process times the number of workers. This script measures that figure
stage by stage (read + decode, detect + landmarks, align, PNG encode) on a fixed mix of real
photos from ../shared/data, times our cv2 resampling against the published FFHQ recipe's
Pillow resampling on the same faces (and checks that the two agree pixel for pixel), and
reports where eyes and mouth land in the output compared with the template.

Run from the repository root:

    python -m benchmarks.align_throughput --limit 60 [--size 512]
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import sys
import time
from pathlib import Path
from unittest import mock

import cv2
import dlib
import numpy as np
import PIL
from PIL import Image

from dfd_data import ffhq_alignment
from dfd_data.faces import find_faces
from dfd_data.ffhq_alignment import (SUPERSAMPLE, TEMPLATE_LEFT_EYE, TEMPLATE_MOUTH, TEMPLATE_RIGHT_EYE,
                                     _pad_beyond_edges, align_face, face_features, ffhq_quad,
                                     points_to_output)
from dfd_data.image_io import decode_image, encode_png, read_bytes

from benchmarks.measure import cpu_name

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FEATURES = {"left_eye": TEMPLATE_LEFT_EYE, "right_eye": TEMPLATE_RIGHT_EYE, "mouth": TEMPLATE_MOUTH}


def round_robin(lists: list[list]) -> list:
    return [item for row in itertools.zip_longest(*lists) for item in row if item is not None]


def pick_photos(limit: int) -> list[Path]:
    """Sorted files taken in turn from CelebA-HQ, APDrawing and FS2K (photo1..3 in turn)."""
    fs2k = [sorted((DATA / "fs2k_train" / "photo" / name).glob("*.jpg")) for name in ("photo1", "photo2", "photo3")]
    groups = [sorted((DATA / "celebahq").glob("*.jpg")), sorted((DATA / "apdrawing").glob("*.png")), round_robin(fs2k)]
    return round_robin(groups)[:limit]


def pillow_align(image: np.ndarray, quad: np.ndarray, size: int) -> np.ndarray:
    """Baseline: the FFHQ recipe as published: shrink, crop, pad with a full-resolution
    Gaussian blur, then Pillow resampling (bilinear QUAD transform at 4x size, Lanczos)."""
    quad = quad.copy()
    qsize = float(np.hypot(*(quad[3] - quad[0])))
    img = image
    shrink = math.floor(qsize / size * 0.5)
    if shrink > 1:
        height, width = img.shape[:2]
        img = cv2.resize(img, (int(round(width / shrink)), int(round(height / shrink))), interpolation=cv2.INTER_AREA)
        quad /= shrink
        qsize /= shrink
    border = max(int(round(qsize * 0.1)), 3)
    height, width = img.shape[:2]
    left = max(math.floor(quad[:, 0].min()) - border, 0)
    top = max(math.floor(quad[:, 1].min()) - border, 0)
    right = min(math.ceil(quad[:, 0].max()) + border, width)
    bottom = min(math.ceil(quad[:, 1].max()) + border, height)
    img = img[top:bottom, left:right]
    quad -= (left, top)
    exact_blur = lambda array, sigma: cv2.GaussianBlur(array, (0, 0), sigma)  # noqa: E731
    with mock.patch.object(ffhq_alignment, "_wide_gaussian", exact_blur):
        img, offset = _pad_beyond_edges(img, quad, qsize, border)
    quad += offset
    big = size * SUPERSAMPLE
    warped = Image.fromarray(img).transform((big, big), Image.QUAD, tuple((quad + 0.5).flatten()), Image.BILINEAR)
    return np.asarray(warped.resize((size, size), Image.LANCZOS))


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def measure(path: Path, size: int) -> dict:
    """One image through the pipeline; stage times in seconds, plus the baseline's."""
    image, decode = timed(lambda: decode_image(read_bytes(path), path))
    faces, detect = timed(find_faces, image)
    result = {"decode": decode, "detect": detect}
    if not faces:
        return result
    landmarks = faces[0].landmarks
    quad = ffhq_quad(landmarks)
    ours, result["align"] = timed(align_face, image, quad, size)
    _, result["encode"] = timed(encode_png, ours)
    baseline, result["baseline"] = timed(pillow_align, image, quad, size)
    result["diff"] = float(np.abs(ours.astype(np.int16) - baseline).mean())
    feats = face_features(landmarks)
    result["points"] = points_to_output(np.stack([feats[name] for name in FEATURES]), quad, size) / size
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=60, help="photos to time (default 60)")
    parser.add_argument("--size", type=int, default=512, help="aligned output size in pixels (default 512)")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: real photo data not found at {DATA} (see its README in the shared data folder)")
        return 0
    photos = pick_photos(args.limit)
    if not photos:
        print(f"skipped: no photos under {DATA}")
        return 0
    cv2.setNumThreads(1)

    print("Face-alignment throughput, one process, single-threaded pipeline (cv2.setNumThreads(1))")
    print(f"machine: {platform.processor() or '-'} / {platform.machine()}, {cpu_name()}, os.cpu_count()={os.cpu_count()}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, cv2 {cv2.__version__}, "
          f"dlib {dlib.__version__}, Pillow {PIL.__version__}")
    counts = {group: sum(p.is_relative_to(DATA / group) for p in photos) for group in ("celebahq", "apdrawing", "fs2k_train")}
    print(f"photos: {len(photos)} from {DATA} ({', '.join(f'{g} {n}' for g, n in counts.items())}); size {args.size}")

    measure(photos[0], args.size)  # warm-up: loads the dlib models, first-call costs
    results = [measure(path, args.size) for path in photos]
    aligned = [r for r in results if "align" in r]
    missed = [path for path, r in zip(photos, results) if "align" not in r]

    def mean_ms(stage: str, rows: list[dict]) -> float:
        return 1000 * float(np.mean([r[stage] for r in rows])) if rows else float("nan")

    print(f"\nStage means, ms per image (decode/detect over {len(results)} tried, align/encode over {len(aligned)} aligned):")
    for stage, label, rows in (("decode", "read + decode", results), ("detect", "detect + landmarks", results),
                               ("align", "align (ours, cv2)", aligned), ("encode", "PNG encode", aligned)):
        print(f"  {label:<20} {mean_ms(stage, rows):8.2f}")
    total = sum(r.get(stage, 0.0) for r in results for stage in ("decode", "detect", "align", "encode"))
    print(f"  end to end: {len(results) / total:.2f} images/s per process at {args.size}px")

    if aligned:
        ours_ms, base_ms = mean_ms("align", aligned), mean_ms("baseline", aligned)
        diffs = [r["diff"] for r in aligned]
        print("\nAlign stage vs the published FFHQ recipe (full-size padding blur, Pillow resampling), same faces:")
        print(f"  ours {ours_ms:.2f} ms/image, baseline {base_ms:.2f} ms/image, ours is {base_ms / ours_ms:.2f}x as fast")
        print(f"  mean |ours - baseline| {np.mean(diffs):.3f} of 255 (worst image {max(diffs):.3f})")

        points = np.stack([r["points"] for r in aligned])
        print("\nWhere features land in the output (fractions of size; template in brackets):")
        for index, (name, template) in enumerate(FEATURES.items()):
            mean = points[:, index].mean(axis=0)
            per_image = np.linalg.norm(points[:, index] - template, axis=1).mean()
            print(f"  {name:<10} ({mean[0]:.3f}, {mean[1]:.3f})  [{template[0]:.3f}, {template[1]:.3f}]  "
                  f"mean off by {np.linalg.norm(mean - template):.4f}, per image {per_image:.4f}")
    print(f"\nDetection rate: {len(aligned)}/{len(results)} ({100 * len(aligned) / len(results):.1f}%)")
    for path in missed:
        print(f"  no face: {path.relative_to(DATA)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

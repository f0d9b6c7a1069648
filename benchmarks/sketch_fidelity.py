"""How close each sketch method comes to real artist sketches, and how fast it runs.

FS2K (../shared/data/fs2k_train) pairs face photos with sketches drawn by professional
artists on the same framing. Each photo is aligned as `dfd-data align` would align it, and
its artist sketch goes through the very same transform; every method then sketches the
aligned photo, and its lines are scored against the artist's inside the face region
(the landmarks' hull, widened) with a symmetric chamfer F-score at a pixel tolerance.
Throughput is images per second at the given size on this machine, in one process.

Run from the repository root (HED methods need `dfd-data weights fetch hed` first):

    python -m benchmarks.sketch_fidelity --per-folder 20 --size 512
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from dfd_data.contact_sheet import contact_sheet
from dfd_data.errors import ModelMissingError
from dfd_data.faces import find_faces
from dfd_data.ffhq_alignment import align_face, ffhq_quad, points_to_output
from dfd_data.image_io import encode_png, read_image
from dfd_data.line_metrics import line_scores
from dfd_data.sketch_methods import METHODS, MethodError, resolve_method, run_method

FS2K = Path(__file__).resolve().parents[2] / "shared" / "data" / "fs2k_train"
SHEET_ROWS = 4


def load_pairs(per_folder: int, size: int) -> list[dict]:
    """Aligned (photo, artist sketch, face mask) triples; photos without a face are left out."""
    pairs = []
    for kind in ("1", "2", "3"):
        photos = sorted((FS2K / "photo" / f"photo{kind}").glob("image*.jpg"))
        taken = 0
        for photo_path in photos:
            sketch_path = FS2K / "sketch" / f"sketch{kind}" / photo_path.name.replace("image", "sketch")
            if taken == per_folder or not sketch_path.exists():
                continue
            photo, sketch = read_image(photo_path), read_image(sketch_path)
            faces = find_faces(photo)
            if not faces or photo.shape != sketch.shape:
                continue
            quad = ffhq_quad(faces[0].landmarks)
            hull = cv2.convexHull(points_to_output(faces[0].landmarks, quad, size).astype(np.int32))
            mask = np.zeros((size, size), np.uint8)
            cv2.fillConvexPoly(mask, hull, 1)
            mask = cv2.dilate(mask, np.ones((size // 25,) * 2, np.uint8)).astype(bool)
            pairs.append({"name": photo_path.relative_to(FS2K).as_posix(), "photo": align_face(photo, quad, size),
                          "artist": cv2.cvtColor(align_face(sketch, quad, size), cv2.COLOR_RGB2GRAY), "mask": mask})
            taken += 1
    return pairs


def on_paper(sketch: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The sketch with everything outside the face region turned to paper."""
    return np.where(mask, sketch, 255).astype(np.uint8)


def score_method(name: str, pairs: list[dict], tol: float, batch_size: int, settings: dict) -> dict:
    method = resolve_method(name, settings.get(name.split("+")[0], {}))
    photos = [pair["photo"] for pair in pairs]
    run_method(method, photos[:1], batch_size=1)  # warm-up: loads weights, first-call costs
    start = time.perf_counter()
    sketches = []
    for index in range(0, len(photos), batch_size):
        sketches += run_method(method, photos[index:index + batch_size], batch_size=batch_size)
    seconds = time.perf_counter() - start
    scores = [line_scores(on_paper(s, p["mask"]), on_paper(p["artist"], p["mask"]), tol) for s, p in zip(sketches, pairs)]
    return {"method": method.id, "sketches": sketches, "images_per_s": len(photos) / seconds,
            **{key: float(np.mean([s[key] for s in scores])) for key in ("f_score", "precision", "recall")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-folder", type=int, default=20, help="pairs from each of photo1, photo2, photo3")
    parser.add_argument("--size", type=int, default=512, help="aligned size in pixels")
    parser.add_argument("--tol", type=float, default=4.0, help="line distance tolerance in pixels at --size")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--set", default="{}", help='JSON {"photocopy": {"mask_radius": 6}, ...} to try parameters')
    parser.add_argument("--out", default="sketch-fidelity-out", help="folder for the contact sheet and JSON table")
    args = parser.parse_args()
    if not FS2K.is_dir():
        print(f"skipped: FS2K data not found at {FS2K}")
        return 0
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    pairs = load_pairs(args.per_folder, args.size)
    print(f"{len(pairs)} FS2K photo/artist pairs aligned at {args.size} px; tolerance {args.tol} px; face region only\n")
    rows = []
    for name in args.methods:
        try:
            rows.append(score_method(name, pairs, args.tol, args.batch_size, json.loads(args.set)))
        except (ModelMissingError, MethodError) as error:
            print(f"{name}: skipped ({error})")
    rows.sort(key=lambda row: -row["f_score"])
    print(f"{'method':<24} {'F-score':>8} {'precision':>10} {'recall':>8} {'images/s':>9}")
    for row in rows:
        print(f"{row['method']:<24} {row['f_score']:8.3f} {row['precision']:10.3f} {row['recall']:8.3f} {row['images_per_s']:9.2f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiles = []
    for index, pair in enumerate(pairs[:: max(1, len(pairs) // SHEET_ROWS)][:SHEET_ROWS]):
        position = pairs.index(pair)
        tiles += [pair["photo"], pair["artist"]] + [row["sketches"][position] for row in rows]
    (out / "sketch_fidelity.png").write_bytes(encode_png(contact_sheet(tiles, thumb=192, columns=2 + len(rows))))
    table = [{k: v for k, v in row.items() if k != "sketches"} for row in rows]
    (out / "sketch_fidelity.json").write_text(json.dumps({"pairs": len(pairs), "size": args.size, "tol": args.tol,
                                                           "methods": table}, indent=2))
    print(f"\ncontact sheet (photo | artist | methods in table order): {out / 'sketch_fidelity.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

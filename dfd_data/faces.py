"""Face detection (dlib HOG) and 68-point landmarks (dlib shape predictor).

The landmark model ships inside the PyPI package face-recognition-models; we locate the file
through the import system without importing the package (its import needs pkg_resources).
"""
from __future__ import annotations

import functools
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import ModelMissingError

LANDMARK_MODEL_FILE = "shape_predictor_68_face_landmarks.dat"
LANDMARK_PACKAGE = "face-recognition-models"
# HOG detection cost grows with pixel count; faces in larger photos are big enough to be
# found on a downscaled copy, and landmarks are then fitted at full resolution.
DETECTION_MAX_SIDE = 1024
# Retry with upsampling (finds faces down to ~40 px, then ~20 px) only while the upsampled
# image stays small enough to be quick.
UPSAMPLE_MAX_SIDE = 1200
# HOG scores of real frontal faces are mostly well above this; round things (a badge, a
# clock) sometimes pass the detector just above 0. Weak detections are kept only when
# nothing stronger was found, so they can neither win "largest face" nor add false faces.
CONFIDENT_SCORE = 0.5


def package_model_path(filename: str, package: str = LANDMARK_PACKAGE) -> Path:
    """Path of a model file shipped inside `package` (module name with underscores)."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / "models" / filename
        if candidate.is_file():
            return candidate
    raise ModelMissingError(
        f"{filename} not found: install the package that ships it with `pip install {package}`"
    )


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # left, top, right, bottom in image pixels
    score: float
    upsample: int
    landmarks: np.ndarray  # (68, 2) float, x/y in image pixels

    @property
    def area(self) -> int:
        left, top, right, bottom = self.box
        return max(0, right - left) * max(0, bottom - top)


@functools.lru_cache(maxsize=1)
def dlib_models():
    """dlib and its landmark model, loaded once per process (a cluster's workers check with it
    that their machine has both)."""
    import dlib  # imported lazily: worker processes load it once and keep it

    return dlib, dlib.shape_predictor(str(package_model_path(LANDMARK_MODEL_FILE)))


_per_thread = threading.local()


def _detector():
    """dlib's HOG detector, one per thread: one detector shared by threads (--backend threading)
    returned other images' faces. Making one is cheap; the landmark model is shared."""
    if not hasattr(_per_thread, "detector"):
        _per_thread.detector = dlib_models()[0].get_frontal_face_detector()
    return _per_thread.detector


def find_faces(image: np.ndarray) -> list[Face]:
    """All frontal faces in an RGB uint8 image, largest first, with 68 landmarks each."""
    (dlib, predictor), detector = dlib_models(), _detector()
    # dlib reads the array's memory as packed rows of RGB: a strided view (a channel-planar
    # tensor's permute, as evaluate's faces are) came out as other pixels, and the
    # detection changed from call to call
    image = np.ascontiguousarray(image)
    height, width = image.shape[:2]
    scale = min(1.0, DETECTION_MAX_SIDE / max(height, width))
    small = image if scale == 1.0 else cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                                                      interpolation=cv2.INTER_AREA)
    rects, scores, upsample = [], [], 0
    while True:
        rects, scores, _ = detector.run(small, upsample, 0.0)
        if rects or max(small.shape[:2]) * 2 ** (upsample + 1) > UPSAMPLE_MAX_SIDE:
            break
        upsample += 1
    detections = list(zip(rects, scores))
    if any(score >= CONFIDENT_SCORE for _rect, score in detections):
        detections = [(rect, score) for rect, score in detections if score >= CONFIDENT_SCORE]
    faces = []
    for rect, score in detections:
        box = tuple(int(round(v / scale)) for v in (rect.left(), rect.top(), rect.right(), rect.bottom()))
        shape = predictor(image, dlib.rectangle(*box))
        points = np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], dtype=np.float64)
        faces.append(Face(box=box, score=float(score), upsample=upsample, landmarks=points))
    faces.sort(key=lambda face: (-face.area, face.box))
    return faces

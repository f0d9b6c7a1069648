"""Comparing line drawings: precision, recall and F-score of ink with a pixel tolerance.

Two drawings of the same lines rarely agree pixel for pixel (a line one pixel to the side is
still the same line), so a predicted ink pixel counts as correct when some true ink lies
within `tol` pixels of it, and a true ink pixel counts as found when some predicted ink lies
within `tol` of it. Distances come from Euclidean distance transforms. Used to score the
sketch simplifier and by the sketch-fidelity benchmark.
"""
from __future__ import annotations

import cv2
import numpy as np

INK_THRESHOLD = 128  # uint8 sketches: below this is ink


def ink_mask(sketch: np.ndarray, threshold: int = INK_THRESHOLD) -> np.ndarray:
    """Boolean HxW: True where the uint8 sketch (255 = paper) is darker than `threshold`."""
    if sketch.ndim != 2:
        raise ValueError(f"expected an HxW sketch, got shape {sketch.shape}")
    if sketch.dtype != np.uint8:  # (a float sketch in 0..1 would be all ink)
        raise ValueError(f"expected a uint8 sketch (255 = paper), got {sketch.dtype}")
    return sketch < threshold


def distance_to_ink(ink: np.ndarray) -> np.ndarray:
    """Euclidean distance (float32, pixels) from every pixel to the nearest True of `ink`;
    +inf everywhere when there is no ink."""
    if not ink.any():
        return np.full(ink.shape, np.inf, np.float32)
    # cv2 measures the distance to the nearest zero pixel, so ink must be 0.
    return cv2.distanceTransform(np.where(ink, 0, 1).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def line_scores(predicted: np.ndarray, truth: np.ndarray, tol: float = 2.0,
                threshold: int = INK_THRESHOLD) -> dict[str, float]:
    """Precision, recall and F-score of the ink of `predicted` against `truth` (uint8 HxW
    sketches of the same size, 255 = paper), with a tolerance of `tol` pixels.

    Empty drawings: both empty is a perfect match (1.0 all round); one empty and the other
    not scores 0 all round (nothing found, or nothing right)."""
    if predicted.shape != truth.shape:
        raise ValueError(f"sketch sizes differ: {predicted.shape} vs {truth.shape}")
    pred_ink, true_ink = ink_mask(predicted, threshold), ink_mask(truth, threshold)
    n_pred, n_true = int(pred_ink.sum()), int(true_ink.sum())
    if n_pred == 0 and n_true == 0:
        return {"precision": 1.0, "recall": 1.0, "f_score": 1.0}
    if n_pred == 0 or n_true == 0:
        return {"precision": 0.0, "recall": 0.0, "f_score": 0.0}
    precision = float((distance_to_ink(true_ink)[pred_ink] <= tol).mean())
    recall = float((distance_to_ink(pred_ink)[true_ink] <= tol).mean())
    f_score = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f_score": f_score}


def line_f_score(predicted: np.ndarray, truth: np.ndarray, tol: float = 2.0,
                 threshold: int = INK_THRESHOLD) -> float:
    """The F-score part of line_scores."""
    return line_scores(predicted, truth, tol, threshold)["f_score"]

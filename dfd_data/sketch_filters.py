"""Classical sketch filters: Canny edges, colour-dodge pencil, and a Photocopy emulation,
plus the levels step that inks the simplifier's grey lines.

Each filter takes an RGB uint8 face and returns a uint8 sketch (255 paper, 0 ink). They need
no weights and run anywhere; Photocopy is the first half of DeepFaceDrawing's recipe.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

PHOTOCOPY_THRESHOLD = 0.75  # fixed in GIMP's filter: darker than 3/4 of the neighbourhood is toner


def _check_rgb(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")


def canny(image: np.ndarray, low: int = 100, high: int = 200, sigma: float = 1.0, equalize: bool = True) -> np.ndarray:
    """Canny edges as ink lines; histogram equalisation first evens out lighting."""
    _check_rgb(image)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if equalize:
        gray = cv2.equalizeHist(gray)
    if sigma > 0:
        gray = cv2.GaussianBlur(gray, (0, 0), sigma)
    return 255 - cv2.Canny(gray, low, high)


def pencil(image: np.ndarray, sigma: float = 8.0) -> np.ndarray:
    """Colour dodge of the gray image by its blurred negative: flat areas go white, edges grey."""
    _check_rgb(image)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    blurred_negative = cv2.GaussianBlur(255 - gray, (0, 0), sigma)
    return cv2.divide(gray, 255 - blurred_negative, scale=256)


def _radius_sigma(radius: float) -> float:
    """GIMP's radius-to-sigma rule: the Gaussian falls to 1/255 at the radius."""
    return math.sqrt(radius * radius / (2.0 * math.log(255.0)))


def photocopy(image: np.ndarray, mask_radius: float = 8.0, sharpness: float = 0.8,
              pct_black: float = 0.2, pct_white: float = 0.2) -> np.ndarray:
    """Photoshop-style Photocopy, following the formulas of GIMP's emulation: pixels darker
    than their neighbourhood become toner, the rest is pushed to white.

    mask_radius sets the neighbourhood, sharpness the detail blur (1 = none), pct_black and
    pct_white the fraction of dark and light ratios that ramp to full black and white."""
    _check_rgb(image)
    red, green, blue = cv2.split(image)
    # HSL lightness, (max + min) / 2: taken over uint8 planes, since numpy's reduction over
    # the three-element channel axis took 24 of the filter's 32 ms at 512 px
    lightness = (cv2.max(cv2.max(red, green), blue).astype(np.float32) + cv2.min(cv2.min(red, green), blue)) * 0.5
    detail = cv2.GaussianBlur(lightness, (0, 0), _radius_sigma(max(1.0, 10.0 * (1.0 - sharpness)) + 1.0))
    neighbourhood = cv2.GaussianBlur(lightness, (0, 0), _radius_sigma(abs(mask_radius) + 1.0))
    ratio = np.where(neighbourhood > 0, detail / np.maximum(neighbourhood, 1e-6), 2.0)

    threshold = PHOTOCOPY_THRESHOLD
    below = ratio < threshold
    dark = ratio[below]
    light = ratio[~below & (ratio < 2.0)]
    # GIMP's edge cases: no dark ratios or pct_black 0 -> ramp 1; pct_black 1 -> ramp 0 (hard
    # threshold); no light ratios or pct_white 1 -> ramp 0; pct_white 0 -> ramp 1.
    if not dark.size or pct_black <= 0:
        ramp_down = 1.0
    else:
        ramp_down = 0.0 if pct_black >= 1 else threshold - float(np.quantile(dark, pct_black))
    if not light.size or pct_white >= 1:
        ramp_up = 0.0
    else:
        ramp_up = 1.0 if pct_white <= 0 else float(np.quantile(light, 1.0 - pct_white)) - threshold

    # both formulas over every pixel (cheaper than gathering each side), each kept where it applies
    if ramp_down > 0:
        toner = detail * (ramp_down - np.minimum(ramp_down, threshold - ratio)) / ramp_down
    else:
        toner = np.zeros_like(detail)
    mult = np.minimum(ramp_up, ratio - threshold) / ramp_up if ramp_up > 0 else np.float32(1.0)
    paper = 255.0 - (1.0 - mult) * (255.0 - detail)
    out = np.where(below, toner, paper)
    out[neighbourhood <= 2.0] = 0.0  # GIMP: a (nearly) black neighbourhood is solid toner
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def levels(sketch: np.ndarray, ink: int, paper: int) -> np.ndarray:
    """Stretch a uint8 sketch's tones: `ink` and darker become black, `paper` and lighter
    white, linear in between (ink=0, paper=255 changes nothing). The simplifier draws its
    lines in mid grey, as probabilities; this turns them into strokes as dark as a pencil's."""
    if not 0 <= ink < paper <= 255:
        raise ValueError(f"levels need 0 <= ink < paper <= 255, got ink={ink}, paper={paper}")
    tones = (np.arange(256, dtype=np.float32) - ink) * (255.0 / (paper - ink))
    return cv2.LUT(sketch, np.clip(np.rint(tones), 0, 255).astype(np.uint8))

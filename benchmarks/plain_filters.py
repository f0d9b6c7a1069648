"""The classical sketch filters and the component crop as a plain implementation would write
them, the baselines of their rows: scikit-image and NumPy over float arrays, Pillow for the
crops, so a row's ratio is the cost of the toolkit's way of doing the work. What they compute
(tests/test_benchmarks.py checks it): the same crops and PNG compression level; Photocopy to
one tone, but where blur rounding moves a pixel across its cut to solid toner in near-black
areas (up to 0.33% of a CelebA-HQ face); pencil to one tone on 98% of the pixels (OpenCV blurs uint8 in fixed point, and the
dodge's division magnifies a tone's difference in dark areas); Canny with a Euclidean
gradient norm where OpenCV sums |dx| and |dy|, so it draws fewer lines (37-84% of the toolkit's
ink on CelebA-HQ faces), 97% of them within a pixel of the toolkit's.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image
from skimage import exposure, feature, filters

from dfd_data.components import PAPER, component_windows
from dfd_data.sketch_filters import PHOTOCOPY_THRESHOLD, _radius_sigma

BT601 = np.array([0.299, 0.587, 0.114])  # OpenCV's RGB -> gray weights
# OpenCV's Gaussian kernels reach 3 sigma on uint8 images and 4 on float ones, mirrored at the
# border without repeating the edge pixel (scipy's "mirror")
UINT8_TRUNCATE, FLOAT_TRUNCATE = 3.0, 4.0


def canny(image: np.ndarray, low: int = 100, high: int = 200, sigma: float = 1.0, equalize: bool = True
          ) -> np.ndarray:
    """scikit-image's Canny on the equalised gray face, thresholds scaled from 0..255 gray to 0..1."""
    gray = image @ BT601 / 255.0
    if equalize:
        gray = exposure.equalize_hist(gray)
    edges = feature.canny(gray, sigma=sigma, low_threshold=low / 255.0, high_threshold=high / 255.0)
    return np.where(edges, 0, 255).astype(np.uint8)


def pencil(image: np.ndarray, sigma: float = 8.0) -> np.ndarray:
    gray = np.rint(image @ BT601)
    blurred_negative = filters.gaussian(255.0 - gray, sigma=sigma, mode="mirror", truncate=UINT8_TRUNCATE,
                                        preserve_range=True)
    denominator = 255.0 - np.rint(blurred_negative)
    with np.errstate(divide="ignore", invalid="ignore"):  # (OpenCV's division by zero gives 0)
        dodged = np.where(denominator > 0, gray * 256.0 / denominator, 0.0)
    return np.clip(np.rint(dodged), 0, 255).astype(np.uint8)


def photocopy(image: np.ndarray, mask_radius: float = 8.0, sharpness: float = 0.8, pct_black: float = 0.2,
              pct_white: float = 0.2) -> np.ndarray:
    """GIMP's Photocopy formulas, one NumPy expression at a time."""
    rgb = image.astype(np.float32)
    lightness = (rgb.max(axis=2) + rgb.min(axis=2)) / 2.0

    def blur(sigma: float) -> np.ndarray:
        return filters.gaussian(lightness, sigma=sigma, mode="mirror", truncate=FLOAT_TRUNCATE, preserve_range=True)

    detail = blur(_radius_sigma(max(1.0, 10.0 * (1.0 - sharpness)) + 1.0))
    neighbourhood = blur(_radius_sigma(abs(mask_radius) + 1.0))
    ratio = np.where(neighbourhood > 0, detail / np.maximum(neighbourhood, 1e-6), 2.0)
    threshold = PHOTOCOPY_THRESHOLD
    dark = ratio[ratio < threshold]
    light = ratio[(ratio >= threshold) & (ratio < 2.0)]
    ramp_down = 1.0 if not dark.size or pct_black <= 0 else \
        0.0 if pct_black >= 1 else threshold - np.quantile(dark, pct_black)
    ramp_up = 0.0 if not light.size or pct_white >= 1 else \
        1.0 if pct_white <= 0 else np.quantile(light, 1.0 - pct_white) - threshold
    out = np.empty_like(lightness, dtype=np.float64)
    below = ratio < threshold
    out[below] = detail[below] * (ramp_down - np.minimum(ramp_down, threshold - ratio[below])) / ramp_down \
        if ramp_down > 0 else 0.0
    above = ~below
    mult = np.minimum(ramp_up, ratio[above] - threshold) / ramp_up if ramp_up > 0 else 1.0
    out[above] = 255.0 - (1.0 - mult) * (255.0 - detail[above])
    out[neighbourhood <= 2.0] = 0.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


FILTERS = {"canny": canny, "pencil": pencil, "photocopy": photocopy}


def crop_and_encode(image: np.ndarray) -> dict[str, bytes]:
    """The five component crops of a square aligned face, cut and saved as PNG with Pillow."""
    face = Image.fromarray(image)
    boxes = {name: (window.x, window.y, window.x + window.size, window.y + window.size)
             for name, window in component_windows(image.shape[0]).items() if name != "remainder"}
    crops = {name: face.crop(box) for name, box in boxes.items()}
    remainder = face.copy()
    for box in boxes.values():
        remainder.paste((PAPER,) * len(face.getbands()), box)
    crops["remainder"] = remainder
    encoded = {}
    for name, crop in crops.items():
        buffer = io.BytesIO()
        crop.save(buffer, format="PNG", compress_level=1)  # (OpenCV's default level, which the toolkit writes at)
        encoded[name] = buffer.getvalue()
    return encoded

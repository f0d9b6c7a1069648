"""The five DeepFaceDrawing components and their windows on the aligned face (DESIGN section 2).

Windows are fixed on the 512x512 canvas; at other resolutions the centres scale with the
canvas and the sizes are rounded to a multiple of 32 (the component encoders halve the size
five times), so every crop stays square and centred on the same facial feature.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BASE_RESOLUTION = 512
COMPONENTS = ("left_eye", "right_eye", "nose", "mouth", "remainder")
# (x, y, size) on the 512 canvas; left_eye is the viewer's left and includes the brow.
_BASE_WINDOWS = {
    "left_eye": (108, 156, 128),
    "right_eye": (255, 156, 128),
    "nose": (182, 232, 160),
    "mouth": (169, 301, 192),
    "remainder": (0, 0, 512),
}
PAPER = 255


@dataclass(frozen=True)
class Window:
    x: int
    y: int
    size: int

    def crop(self, image: np.ndarray) -> np.ndarray:
        return image[self.y:self.y + self.size, self.x:self.x + self.size]


def component_windows(resolution: int = BASE_RESOLUTION) -> dict[str, Window]:
    """The component windows for a square canvas of `resolution` (a multiple of 32)."""
    if resolution % 32 or resolution < 64:
        raise ValueError(f"resolution {resolution} must be a multiple of 32 and at least 64")
    scale = resolution / BASE_RESOLUTION
    windows = {}
    for name, (x, y, size) in _BASE_WINDOWS.items():
        new_size = max(32, int(np.floor(size * scale / 32 + 0.5)) * 32)
        cx, cy = (x + size / 2) * scale, (y + size / 2) * scale
        new_x = int(np.clip(round(cx - new_size / 2), 0, resolution - new_size))
        new_y = int(np.clip(round(cy - new_size / 2), 0, resolution - new_size))
        windows[name] = Window(new_x, new_y, new_size)
    return windows


def crop_components(image: np.ndarray) -> dict[str, np.ndarray]:
    """Crop the five components of a square aligned face or sketch (gray or RGB uint8).

    The remainder is the whole canvas with the four feature windows painted white, as the
    remainder encoder sees it in training and at inference."""
    height, width = image.shape[:2]
    if height != width:
        raise ValueError(f"expected a square image, got {width}x{height}")
    windows = component_windows(height)
    crops = {name: windows[name].crop(image).copy() for name in COMPONENTS if name != "remainder"}
    remainder = image.copy()
    for name in crops:
        window = windows[name]
        remainder[window.y:window.y + window.size, window.x:window.x + window.size] = PAPER
    crops["remainder"] = remainder
    return crops

"""Contact sheets: grids of thumbnails so a person can eyeball what a step produced."""
from __future__ import annotations

import cv2
import numpy as np


def contact_sheet(images: list[np.ndarray], thumb: int = 128, columns: int = 8,
                  marks: list[tuple[float, float]] = ()) -> np.ndarray:
    """Tile RGB or gray uint8 images into one RGB sheet; `marks` are (x, y) fractions of each
    tile drawn as small crosses (e.g. template eye positions, to check alignment at a glance)."""
    if not images:
        raise ValueError("no images for the contact sheet")
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    sheet = np.full((rows * thumb, columns * thumb, 3), 255, np.uint8)
    for index, image in enumerate(images):
        tile = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        height, width = tile.shape[:2]
        scale = thumb / max(height, width)
        tile = cv2.resize(tile, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
        for fx, fy in marks:
            centre = (int(fx * tile.shape[1]), int(fy * tile.shape[0]))
            cv2.drawMarker(tile, centre, (0, 255, 0), cv2.MARKER_CROSS, max(5, thumb // 12), 1)
        top, left = (index // columns) * thumb, (index % columns) * thumb
        sheet[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
    return sheet

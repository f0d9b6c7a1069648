"""Synthetic (rough, clean) sketch pairs for training the sketch simplifier.

No paired rough/clean face sketches can be had here, so pairs are made: start from clean
lines (a user's clean sketches, or face-like drawings made procedurally by
`procedural_clean_lines`) and draw a rough version of them with `degrade`. The rough version
imitates what the simplifier meets in use, a Photocopy-filtered face photo or a hasty hand:
lines warped, doubled, thickened, filled in and broken, tone and hatching where the clean
drawing has none, speckle where skin texture or stubble would copy, paper grain, blur and
noise. The network learns to keep what the clean drawing has and delete the rest, so every
mark the rough version adds away from a clean line is a mark it learns to erase.

Arrays are uint8 HxW, 255 = paper, 0 = ink. Inside, the work is done on float32 "ink" maps
(0 = paper, 1 = full ink), which add up by screening: 1 - (1 - a)(1 - b).
Everything random comes from one numpy Generator, so a seed fixes every pair.
"""
from __future__ import annotations

import cv2
import numpy as np

SUPERSAMPLE = 2  # procedural strokes are drawn at twice the size and area-averaged down
MIN_WIDTH = 0.9  # px, narrowest clean stroke
_SHIFT = 4  # cv2 sub-pixel bits for drawing coordinates


def _as_rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _screen(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Ink on top of ink: darker than either, never past full ink."""
    return 1.0 - (1.0 - a) * (1.0 - b)


# ---------------------------------------------------------------------------- drawing


def _bezier(control: np.ndarray, count: int) -> np.ndarray:
    """Points on the Bezier curve with the given control points (K x 2), count x 2."""
    t = np.linspace(0.0, 1.0, max(2, count))[None, :, None]
    points = np.repeat(np.asarray(control, np.float64)[:, None, :], t.shape[1], axis=1)
    while len(points) > 1:  # de Casteljau: repeated linear interpolation
        points = points[:-1] * (1 - t) + points[1:] * t
    return points[0]


def _spline(points, count: int) -> np.ndarray:
    """A smooth curve through `points` (Catmull-Rom), about count x 2."""
    points = np.asarray(points, np.float64)
    if len(points) < 3:
        return _bezier(points, count)
    padded = np.vstack([2 * points[0] - points[1], points, 2 * points[-1] - points[-2]])
    per = max(2, count // (len(points) - 1))
    t = np.linspace(0.0, 1.0, per, endpoint=False)[:, None]
    pieces = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1], padded[i], padded[i + 1], padded[i + 2]
        pieces.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                             + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
    pieces.append(points[-1:])
    return np.vstack(pieces)


def _arc(centre, radii, start: float, stop: float, tilt: float = 0.0, count: int = 40) -> np.ndarray:
    """Points on an elliptical arc; angles in radians, y pointing down."""
    angles = np.linspace(start, stop, count)
    x, y = radii[0] * np.cos(angles), radii[1] * np.sin(angles)
    c, s = np.cos(tilt), np.sin(tilt)
    return np.stack([centre[0] + c * x - s * y, centre[1] + s * x + c * y], axis=1)


def _fixed(points: np.ndarray, scale: float) -> np.ndarray:
    return np.rint(np.asarray(points) * scale * (1 << _SHIFT)).astype(np.int32)


def _draw_stroke(canvas: np.ndarray, points: np.ndarray, width: float, value: int,
                 taper: bool, scale: float) -> None:
    """Draw a polyline of `width` pixels (at the final scale) into a uint8 ink canvas drawn at
    `scale` times that size; a tapered stroke thins towards both ends like a pen lifted."""
    pts = _fixed(points, scale)
    if len(pts) < 2:
        return
    if not taper:
        cv2.polylines(canvas, [pts], False, int(value), max(1, int(round(width * scale))), cv2.LINE_AA, _SHIFT)
        return
    t = np.linspace(0.0, 1.0, len(pts) - 1)
    widths = width * scale * (0.35 + 0.65 * np.sin(np.pi * np.clip(t, 0.02, 0.98)) ** 0.5)
    for (p, q), w in zip(zip(pts[:-1], pts[1:]), widths):
        cv2.line(canvas, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), int(value), max(1, int(round(w))),
                 cv2.LINE_AA, _SHIFT)


class _Pen:
    """Collects strokes and filled shapes, then renders them anti-aliased on paper."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.strokes: list[tuple] = []
        self.fills: list[tuple] = []

    def stroke(self, points, width: float, value: int = 255, taper: bool = False) -> None:
        # thinner than MIN_WIDTH renders as a faint gray trace that breaks up when binarised
        self.strokes.append((np.asarray(points, np.float64), max(width, MIN_WIDTH), value, taper))

    def fill(self, points, value: int = 255) -> None:
        self.fills.append((np.asarray(points, np.float64), value))

    def rotate(self, centre, angle: float) -> None:
        c, s = np.cos(angle), np.sin(angle)
        matrix = np.array([[c, -s], [s, c]])

        def move(points):
            return (points - centre) @ matrix.T + centre

        self.strokes = [(move(p), w, v, t) for p, w, v, t in self.strokes]
        self.fills = [(move(p), v) for p, v in self.fills]

    def render(self) -> np.ndarray:
        """uint8 sketch, 255 = paper."""
        ink = np.zeros((self.height * SUPERSAMPLE, self.width * SUPERSAMPLE), np.uint8)
        for points, value in self.fills:
            cv2.fillPoly(ink, [_fixed(points, SUPERSAMPLE)], int(value), cv2.LINE_AA, _SHIFT)
        for points, width, value, taper in self.strokes:
            _draw_stroke(ink, points, width, value, taper, SUPERSAMPLE)
        ink = cv2.resize(ink, (self.width, self.height), interpolation=cv2.INTER_AREA)
        return 255 - ink


def _wobble(rng: np.random.Generator, points: np.ndarray, amount: float) -> np.ndarray:
    """Bend a curve a little with a smooth random offset, so no two strokes are textbook."""
    n = len(points)
    knots = rng.normal(0.0, amount, size=(4, 2))
    offsets = np.stack([np.interp(np.linspace(0, 3, n), np.arange(4), knots[:, k]) for k in (0, 1)], axis=1)
    return points + offsets


def _draw_face(pen: _Pen, rng: np.random.Generator, lw: float) -> None:
    """A face in a DeepFaceDrawing-like line style: contour, hair, brows, eyes, nose, mouth,
    ears and neck, each present with some probability and drawn with jitter."""
    size = min(pen.height, pen.width)
    u = rng.uniform
    cx = pen.width / 2 + rng.normal(0, 0.04 * size)
    cy = pen.height / 2 + rng.normal(0, 0.04 * size)
    a = u(0.2, 0.3) * size           # half width of the head
    b = a * u(1.25, 1.45)            # half height, skull top to chin
    wob = 0.012 * a

    def ink() -> int:  # pen darkness
        return int(u(190, 255))

    def line(points, scale=1.0, taper=None):
        pen.stroke(_wobble(rng, np.asarray(points), wob), lw * scale * u(0.75, 1.3), ink(),
                   bool(rng.random() < 0.5) if taper is None else taper)

    # jaw and cheeks: the lower half of the head, narrowing towards the chin
    t = np.linspace(-u(0.05, 0.3), np.pi + u(0.05, 0.3), 80)
    narrow = 1 - u(0.15, 0.35) * np.sin(np.clip(t, 0, np.pi)) ** 2
    jaw = np.stack([cx + a * np.cos(t) * narrow, cy + b * np.sin(t)], axis=1)
    if rng.random() < 0.3:  # an open contour: a gap on one cheek
        cut = rng.integers(15, 65)
        line(jaw[:cut], 1.3)
        line(jaw[cut + rng.integers(4, 12):], 1.3)
    else:
        line(jaw, 1.3)

    # hair: an outer outline over the skull, an inner one along the forehead (the hairline)
    # and down the sides, and strands flowing between the two from the parting
    top = cy - b * u(1.0, 1.15)
    drop = u(-0.2, 1.3)  # how far down the sides the hair falls, in units of b
    parting_x = cx + rng.normal(0, 0.25 * a)
    hairline_y = cy - b * u(0.45, 0.65)
    outer, inner = {}, {}
    for side in (-1, 1):
        wide = a * u(1.05, 1.22)
        outer[side] = _bezier([(parting_x, top), (cx + side * a * 0.75, top + 0.05 * b),
                               (cx + side * wide, cy - 0.5 * b), (cx + side * wide * u(0.95, 1.05), cy + drop * b)], 60)
        inner[side] = _bezier([(parting_x, hairline_y - 0.05 * b), (cx + side * a * 0.6, hairline_y - u(-0.05, 0.1) * b),
                               (cx + side * a * 0.98, cy - 0.25 * b), (cx + side * a * 0.95, cy + max(drop, -0.15) * b)], 60)
    line(np.vstack([outer[-1][::-1], outer[1]]), 1.2, taper=False)
    if rng.random() < 0.8:
        line(np.vstack([inner[-1][:40][::-1], inner[1][:40]]), 1.0)
    for _ in range(rng.integers(3, 16)):
        side = rng.choice([-1, 1])
        mix = u(0.1, 0.9)
        strand = outer[side] * (1 - mix) + inner[side] * mix
        line(strand[int(u(0, 0.4) * 60):int(u(0.5, 1.0) * 60)], u(0.5, 0.9), taper=True)

    # brows, eyes, nose, mouth: mirrored placements with independent jitter
    eye_y = cy + b * u(-0.12, 0.04)
    for side in (-1, 1):
        ex = cx + side * a * u(0.36, 0.46)
        ey = eye_y + rng.normal(0, 0.01 * b)
        half = a * u(0.16, 0.22)
        lid = half * u(0.35, 0.6)
        inner, outer = np.array([ex - side * half, ey]), np.array([ex + side * half, ey - u(0, 0.25) * lid])
        upper = _bezier([inner, [ex - side * half * 0.3, ey - lid], [ex + side * half * 0.5, ey - lid], outer], 30)
        line(upper, 1.1)
        if rng.random() < 0.8:
            lower = _bezier([inner + [0, 0.1 * lid], [ex, ey + lid * u(0.5, 0.9)], outer], 30)
            line(lower[int(u(0, 0.3) * 30):], 0.8)
        if rng.random() < 0.85:
            iris = lid * u(0.55, 0.8)
            ix = ex + rng.normal(0, 0.1 * half)
            if rng.random() < 0.5:
                line(_arc((ix, ey), (iris, iris), 0, 2 * np.pi, count=40), 0.8, taper=False)
            else:
                line(_arc((ix, ey), (iris, iris), u(-0.6, -0.1), np.pi + u(0.1, 0.6), count=30), 0.8)
            if rng.random() < 0.5:
                pen.fill(_arc((ix, ey), (iris * 0.4, iris * 0.4), 0, 2 * np.pi, count=16), ink())
        if rng.random() < 0.9:  # brow
            by = ey - b * u(0.14, 0.22)
            span = half * u(1.1, 1.4)
            brow = _bezier([[ex - side * span, by + 0.02 * b], [ex, by - u(0.03, 0.08) * b],
                            [ex + side * span, by + u(0, 0.05) * b]], 30)
            line(brow, u(1.0, 1.6))
            if rng.random() < 0.4:  # a drawn brow shape: second, lower edge
                line(brow[3:-2] + [0, u(0.02, 0.04) * b], 0.8)
        if rng.random() < 0.7:  # ear
            ear_x = cx + side * a * u(0.92, 1.02)
            ear = _bezier([[ear_x, ey + 0.02 * b], [ear_x + side * a * 0.2, ey - 0.05 * b],
                           [ear_x + side * a * 0.18, ey + 0.35 * b], [ear_x - side * a * 0.02, ey + 0.4 * b]], 30)
            line(ear, 1.0)
        # nostril
        nose_y = cy + b * u(0.3, 0.42)
        if rng.random() < 0.85:
            nx = cx + side * a * u(0.1, 0.16)
            line(_arc((nx, nose_y), (a * 0.06, b * 0.035), np.pi / 2 - side * 0.3, np.pi / 2 + side * 2.6, count=20), 0.9)
    # nose: tip and sometimes one side of the bridge
    nose_y = cy + b * u(0.32, 0.42)
    if rng.random() < 0.7:
        line(_arc((cx, nose_y), (a * u(0.07, 0.11), b * 0.04), 0.2, np.pi - 0.2, count=20), 0.9)
    if rng.random() < 0.4:
        side = rng.choice([-1, 1])
        line(_bezier([[cx + side * a * 0.12, eye_y + 0.05 * b], [cx + side * a * 0.08, cy + 0.2 * b],
                      [cx + side * a * 0.13, nose_y - 0.04 * b]], 25), 0.8, taper=True)
    # mouth
    my = cy + b * u(0.55, 0.68)
    mw = a * u(0.25, 0.4)
    smile = b * u(-0.03, 0.05)
    corners = rng.normal(0, 0.01 * b, 2)
    mid_line = _bezier([[cx - mw, my + corners[0]], [cx, my + 2 * smile], [cx + mw, my + corners[1]]], 40)
    line(mid_line, 1.1)
    if rng.random() < 0.6:
        bow = b * u(0.04, 0.08)
        line(_spline([[cx - mw * 0.95, my], [cx - mw * 0.35, my - bow], [cx, my - bow * 0.6],
                      [cx + mw * 0.35, my - bow], [cx + mw * 0.95, my]], 40), 0.8)
    if rng.random() < 0.6:
        lip = b * u(0.06, 0.12)
        lower = _bezier([[cx - mw * 0.8, my + 0.3 * lip], [cx, my + 1.5 * lip], [cx + mw * 0.8, my + 0.3 * lip]], 30)
        line(lower[int(u(0, 0.3) * 30):int(u(0.7, 1.0) * 30)], 0.8)
    # neck and shoulders
    if rng.random() < 0.8:
        for side in (-1, 1):
            nx = cx + side * a * u(0.45, 0.6)
            neck = _bezier([[nx, cy + 0.75 * b], [nx - side * 0.05 * a, cy + 1.2 * b], [nx, cy + 1.6 * b]], 25)
            line(neck, 1.0)
            if rng.random() < 0.6:
                shoulder = _bezier([neck[-1], neck[-1] + [side * a * 0.6, 0.15 * b], neck[-1] + [side * a * 1.6, 0.4 * b]], 25)
                line(shoulder, 1.2)


def _draw_doodles(pen: _Pen, rng: np.random.Generator, lw: float, count: int) -> None:
    """Generic line work: smooth curves, ellipses and arcs, straight lines."""
    h, w = pen.height, pen.width
    for _ in range(count):
        kind = rng.random()
        width = lw * rng.uniform(0.6, 1.5)
        value = int(rng.uniform(190, 255))
        if kind < 0.5:
            n = rng.integers(3, 7)
            start = rng.uniform([0, 0], [w, h])
            steps = rng.normal(0, 0.12 * min(h, w), size=(n - 1, 2)).cumsum(axis=0)
            pen.stroke(_spline(np.vstack([start, start + steps]), 20 * n), width, value, bool(rng.random() < 0.5))
        elif kind < 0.8:
            centre = rng.uniform([0, 0], [w, h])
            radii = rng.uniform(0.02, 0.2, 2) * min(h, w)
            start = rng.uniform(0, 2 * np.pi)
            sweep = rng.uniform(0.8, 2 * np.pi)
            pen.stroke(_arc(centre, radii, start, start + sweep, rng.uniform(0, np.pi), 60), width, value, False)
        else:
            p = rng.uniform([0, 0], [w, h])
            q = p + rng.normal(0, 0.2 * min(h, w), 2)
            pen.stroke(np.linspace(p, q, 10), width, value, bool(rng.random() < 0.5))


def procedural_clean_lines(rng, size) -> np.ndarray:
    """A clean line drawing (uint8, 255 = paper) of `size` (int or (height, width)): most
    often a face-like drawing (contour, hair, brows, eyes, nose, mouth, ears, neck) with a
    few generic curves around it, otherwise only generic curves, ellipses, arcs and lines.
    Pen width and darkness vary per drawing and per stroke."""
    rng = _as_rng(rng)
    height, width = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if min(height, width) < 16:
        raise ValueError(f"size must be at least 16 px a side, got {height}x{width}")
    pen = _Pen(height, width)
    lw = rng.uniform(0.8, 2.2) * max(1.0, min(height, width) / 512) ** 0.5
    if rng.random() < 0.8:
        _draw_face(pen, rng, lw)
        _draw_doodles(pen, rng, lw, int(rng.integers(0, 5)))
        pen.rotate(np.array([width / 2, height / 2]), rng.normal(0, 0.12))
    else:
        _draw_doodles(pen, rng, lw, int(rng.integers(6, 20)))
    return pen.render()


# ---------------------------------------------------------------------------- degradation


def _smooth_noise(rng: np.random.Generator, shape, wavelength: float) -> np.ndarray:
    """Random smooth field, about unit spread, varying over `wavelength` pixels."""
    h, w = shape
    grid = rng.normal(0.0, 1.0, size=(max(2, int(h / wavelength) + 2), max(2, int(w / wavelength) + 2))).astype(np.float32)
    field = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return field / max(float(field.std()), 1e-3)


def _region(rng: np.random.Generator, shape, wavelength: float, coverage: float) -> np.ndarray:
    """A soft mask (0..1) covering about `coverage` of the image in smooth blobs."""
    field = _smooth_noise(rng, shape, wavelength)
    level = np.quantile(field, 1.0 - coverage)
    return np.clip((field - level) * 3.0, 0.0, 1.0)


def _warp(ink: np.ndarray, rng: np.random.Generator, amplitude: float, wavelength: float) -> np.ndarray:
    """Move the drawing by a smooth random displacement of about `amplitude` pixels."""
    h, w = ink.shape
    dx = _smooth_noise(rng, ink.shape, wavelength) * amplitude
    dy = _smooth_noise(rng, ink.shape, wavelength) * amplitude
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(ink, xs + dx, ys + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _blur(ink: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(ink, (0, 0), sigma) if sigma > 0.05 else ink


def _thicken(ink, rng, strength):
    """Lines wider in some places than others (pen pressure, or Photocopy's dark bands)."""
    radius = int(rng.integers(1, 3 + int(strength > 0.6)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    thick = cv2.dilate(ink, kernel)
    mask = _region(rng, ink.shape, rng.uniform(30, 120), rng.uniform(0.2, 0.8) * min(1.0, strength + 0.2))
    ink = np.maximum(ink, thick * mask)
    if rng.random() < 0.5 * strength:  # one-sided smear: a dark band on one side of the line
        dx, dy = rng.uniform(-2.5, 2.5, 2)
        shifted = cv2.warpAffine(ink, np.float32([[1, 0, dx], [0, 1, dy]]), ink.shape[::-1])
        ink = np.maximum(ink, shifted * _region(rng, ink.shape, rng.uniform(30, 120), 0.5))
    return ink


def _fill_regions(ink, clean, rng, strength):
    """Fill some small areas the clean lines enclose (irises, nostrils, brows, lips), as
    Photocopy turns dark features into solid blobs."""
    paper = (clean >= 160).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(paper, connectivity=4)
    h, w = clean.shape
    small = (stats[:, cv2.CC_STAT_AREA] >= 12) & (stats[:, cv2.CC_STAT_AREA] <= 0.03 * h * w)
    inner = (stats[:, cv2.CC_STAT_LEFT] > 0) & (stats[:, cv2.CC_STAT_TOP] > 0) \
        & (stats[:, cv2.CC_STAT_LEFT] + stats[:, cv2.CC_STAT_WIDTH] < w) \
        & (stats[:, cv2.CC_STAT_TOP] + stats[:, cv2.CC_STAT_HEIGHT] < h)
    chosen = np.flatnonzero(small & inner & (rng.random(count) < rng.uniform(0.2, 0.6) * strength))
    if len(chosen) == 0:
        return ink
    tone = np.zeros(count, np.float32)
    tone[chosen] = rng.uniform(0.25, 1.0, len(chosen))
    fill = _blur(tone[labels], rng.uniform(0.3, 1.0))
    if rng.random() < 0.5:  # mottled rather than flat
        fill *= np.clip(0.75 + 0.35 * _smooth_noise(rng, ink.shape, rng.uniform(3, 8)), 0, 1)
    return _screen(ink, fill)


def _stroke_copies(ink, rng, strength):
    """Doubled and jittered strokes: the same lines drawn again slightly off, fainter."""
    out = ink
    for _ in range(int(rng.integers(1, 2 + round(2 * strength)))):
        copy = _warp(ink, rng, rng.uniform(0.6, 2.5) * strength, rng.uniform(20, 80))
        dx, dy = rng.normal(0, 0.8 * strength, 2)
        copy = cv2.warpAffine(copy, np.float32([[1, 0, dx], [0, 1, dy]]), ink.shape[::-1])
        keep = _region(rng, ink.shape, rng.uniform(20, 80), rng.uniform(0.3, 0.9))
        out = _screen(out, copy * keep * rng.uniform(0.3, 0.9))
    return out


def _spurious_strokes(shape, clean_ink, rng, strength):
    """Short strokes that are not in the clean drawing: construction lines beside real
    lines, hairy ends, stray marks."""
    h, w = shape
    canvas = np.zeros((h, w), np.uint8)
    count = rng.poisson(strength * rng.uniform(0.3, 1.5) * h * w / 2500)
    if count == 0:
        return canvas.astype(np.float32)
    ys, xs = np.nonzero(clean_ink > 0.5)
    smooth = _blur(clean_ink, 1.5)
    gx, gy = cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1)
    for _ in range(count):
        if len(xs) and rng.random() < 0.65:  # beside a real line, roughly along it
            k = rng.integers(len(xs))
            x, y = float(xs[k]), float(ys[k])
            g = np.array([gx[ys[k], xs[k]], gy[ys[k], xs[k]]])
            norm = np.hypot(*g)
            if norm < 1e-4:
                g = rng.normal(0, 1, 2)
                norm = np.hypot(*g)
            normal = g / norm
            tangent = np.array([-normal[1], normal[0]])
            centre = np.array([x, y]) + normal * rng.choice([-1, 1]) * rng.uniform(1.5, 5.0)
            direction = tangent + rng.normal(0, 0.15, 2)
        else:
            centre = rng.uniform([0, 0], [w, h])
            angle = rng.uniform(0, 2 * np.pi)
            direction = np.array([np.cos(angle), np.sin(angle)])
        direction /= max(np.hypot(*direction), 1e-6)
        length = rng.uniform(4, 30)
        bend = np.array([-direction[1], direction[0]]) * rng.normal(0, 0.12 * length)
        points = _bezier([centre - direction * length / 2, centre + bend, centre + direction * length / 2], 12)
        _draw_stroke(canvas, points, rng.uniform(0.6, 1.8), int(rng.uniform(80, 230)), bool(rng.random() < 0.6), 1.0)
    return canvas.astype(np.float32) / 255.0


def _hatching(shape, rng, strength):
    """Patches of parallel (sometimes crossed) strokes, as a sketcher shades."""
    h, w = shape
    out = np.zeros((h, w), np.float32)
    for _ in range(rng.poisson(strength * rng.uniform(0.5, 2.0) * h * w / 65536 + 0.3)):
        canvas = np.zeros((h, w), np.uint8)
        cx, cy = rng.uniform([0, 0], [w, h])
        radius = rng.uniform(10, 60)
        spacing = rng.uniform(2.5, 7.0)
        for angle in [rng.uniform(0, np.pi)] + ([rng.uniform(0, np.pi)] if rng.random() < 0.3 else []):
            along = np.array([np.cos(angle), np.sin(angle)])
            across = np.array([-along[1], along[0]])
            for offset in np.arange(-radius, radius, spacing):
                half = np.sqrt(max(radius ** 2 - offset ** 2, 0.0)) * rng.uniform(0.6, 1.2)
                centre = np.array([cx, cy]) + across * (offset + rng.normal(0, 0.4)) + along * rng.normal(0, 3)
                ends = [centre - along * half, centre + along * half]
                _draw_stroke(canvas, np.array(ends), rng.uniform(0.6, 1.4), int(rng.uniform(100, 230)), False, 1.0)
        out = _screen(out, canvas.astype(np.float32) / 255.0 * rng.uniform(0.4, 1.0))
    return out


def _shading(shape, rng, strength):
    """Soft tone: smooth gray blobs with no lines of their own."""
    mask = _region(rng, shape, rng.uniform(20, 90), rng.uniform(0.05, 0.3))
    return _blur(mask, rng.uniform(2, 8)) * rng.uniform(0.05, 0.35) * min(strength, 1.0)


def _speckle(shape, rng, strength):
    """Clusters of dots and short dashes, as skin texture, stubble or hair copy."""
    h, w = shape
    density = rng.uniform(0.001, 0.008) * strength
    impulses = (rng.random((h, w)) < density).astype(np.float32)
    impulses *= rng.uniform(0.3, 1.0, (h, w)).astype(np.float32)
    if rng.random() < 0.4:  # elongated, like stubble
        length = int(rng.integers(1, 4))
        kernel = np.zeros((2 * length + 1, 2 * length + 1), np.float32)
        cv2.line(kernel, (0, 0), (2 * length, int(rng.integers(0, 2 * length + 1))), 1.0, 1)
        impulses = cv2.filter2D(impulses, -1, kernel)
    dots = np.clip(_blur(impulses, rng.uniform(0.4, 0.9)) * rng.uniform(1.0, 3.0), 0, 1)
    return dots * _region(rng, shape, rng.uniform(20, 80), rng.uniform(0.1, 0.5))


def _strands(shape, rng, strength):
    """Dense fine strokes flowing in one smoothly turning direction, as hair, fur or fabric
    come out of a Photocopy filter: texture that a clean drawing renders as a few lines."""
    h, w = shape
    region = _region(rng, shape, rng.uniform(40, 120), rng.uniform(0.1, 0.4))
    weights = region.ravel().astype(np.float64)
    if weights.sum() <= 0:
        return np.zeros(shape, np.float32)
    count = min(1500, int(strength * weights.sum() / rng.uniform(40, 150)))
    angle = _smooth_noise(rng, shape, rng.uniform(40, 150)) * rng.uniform(0.3, 1.0) + rng.uniform(0, np.pi)
    canvas = np.zeros(shape, np.uint8)
    value_range = (rng.uniform(40, 120), rng.uniform(130, 230))
    for k in rng.choice(h * w, size=count, p=weights / weights.sum()):
        y, x = divmod(int(k), w)
        theta = angle[y, x] + rng.normal(0, 0.12)
        direction = np.array([np.cos(theta), np.sin(theta)])
        length = rng.uniform(6, 40)
        bend = np.array([-direction[1], direction[0]]) * rng.normal(0, 0.08 * length)
        centre = np.array([x, y], np.float64)
        points = _bezier([centre - direction * length / 2, centre + bend, centre + direction * length / 2], 8)
        cv2.polylines(canvas, [_fixed(points, 1.0)], False, int(rng.uniform(*value_range)), 1, cv2.LINE_AA, _SHIFT)
    return canvas.astype(np.float32) / 255.0


def _mottle(shape, rng, strength):
    """Blotchy light-gray texture, as skin pores and uneven tone copy."""
    texture = np.clip(_smooth_noise(rng, shape, rng.uniform(1.5, 5.0)) - rng.uniform(0.3, 1.5), 0, None)
    texture = np.clip(texture * rng.uniform(0.1, 0.45), 0, 1)
    return texture * _region(rng, shape, rng.uniform(30, 120), rng.uniform(0.2, 0.8)) * strength


def _halo(ink, rng):
    """Soft gray glow along the lines, the blurred edge a photo's contours leave."""
    sigma = rng.uniform(0.8, 3.0)
    glow = _blur(ink, sigma) * (1.0 + 1.5 * sigma)
    return _screen(ink, np.clip(glow, 0, 1) * rng.uniform(0.2, 0.7))


def _photocopy_like(ink, clean, rng, strength):
    """Re-render the drawing through a Photocopy-style local-contrast filter: make a tone
    image as a photo of the drawing might look (soft-edged lines, some enclosed areas dark,
    shading, fine texture), then ink what is darker than its surroundings and wash out the
    rest. Gives lines with pale halos, dark areas copied only around their edges, and grain."""
    tone = _blur(ink, rng.uniform(0.6, 2.0))
    tone = np.clip(tone / max(float(np.percentile(tone, 99.7)), 0.05), 0, 1) * rng.uniform(0.4, 0.9)
    tone = _fill_regions(tone, clean, rng, strength)
    if rng.random() < 0.5:
        tone = _screen(tone, _shading(ink.shape, rng, strength))
    tone += _smooth_noise(rng, ink.shape, rng.uniform(1.5, 4)) * rng.uniform(0.005, 0.04) * strength
    light = np.clip(1.0 - tone, 0.0, 1.0)
    detail = _blur(light, rng.uniform(0.4, 1.2))
    surround = _blur(light, rng.uniform(2.0, 6.0))
    ratio = detail / np.maximum(surround, 0.02)
    threshold = rng.uniform(0.85, 0.98)
    ramp_down, ramp_up = rng.uniform(0.1, 0.5), rng.uniform(0.01, 0.1)
    out_light = np.where(ratio < threshold,
                         detail * (1.0 - np.clip((threshold - ratio) / ramp_down, 0, 1)),
                         1.0 - (1.0 - np.clip((ratio - threshold) / ramp_up, 0, 1)) * (1.0 - detail))
    return np.clip(1.0 - out_light, 0.0, 1.0).astype(np.float32)


def _paper(shape, rng, strength):
    """Paper grain and uneven lighting, as faint ink everywhere."""
    grain = np.abs(_blur(rng.normal(0, 1, shape).astype(np.float32), rng.uniform(0.5, 1.2)))
    stains = np.clip(_smooth_noise(rng, shape, rng.uniform(40, 200)), 0, None)
    return np.clip(grain * rng.uniform(0.0, 0.08) * strength + stains * rng.uniform(0.0, 0.06) * strength, 0, 1)


def degrade(clean: np.ndarray, rng, strength: float = 1.0) -> np.ndarray:
    """A rough version of the clean uint8 sketch `clean` (255 = paper): the same drawing as
    a Photocopy-filtered photo or a hasty hand would give it. `strength` (0..1.5) scales how
    much is changed; `rng` is a numpy Generator or a seed."""
    rng = _as_rng(rng)
    if clean.dtype != np.uint8 or clean.ndim != 2:
        raise ValueError(f"expected a uint8 HxW sketch, got {clean.dtype} with shape {clean.shape}")
    strength = float(np.clip(strength, 0.0, 1.5))
    if strength <= 0:
        return clean.copy()
    clean_ink = (255.0 - clean.astype(np.float32)) / 255.0
    ink = clean_ink

    def chance(p: float) -> bool:  # each step happens more often at higher strength
        return rng.random() < min(1.0, p * strength)

    # what happens to the real lines
    if chance(0.8):
        ink = _warp(ink, rng, rng.uniform(0.3, 1.5) * strength, rng.uniform(24, 96))
    if chance(0.5):
        ink = _thicken(ink, rng, strength)
    if chance(0.3):
        ink = _fill_regions(ink, clean, rng, strength)
    if chance(0.6):
        ink = _stroke_copies(ink, rng, strength)
    if chance(0.5):  # pressure: some stretches drawn lighter
        pressure = 1.0 - _region(rng, ink.shape, rng.uniform(20, 100), 0.5) * rng.uniform(0.3, 0.75) * min(strength, 1)
        ink = ink * pressure
    if chance(0.3):  # breaks, where the pen skipped or the copy dropped out
        holes = _region(rng, ink.shape, rng.uniform(3, 10), rng.uniform(0.05, 0.2))
        ink = ink * (1.0 - holes)
    if chance(0.35):
        ink = _halo(ink, rng)
    if chance(0.35):
        ink = _photocopy_like(ink, clean, rng, strength)

    # marks that are not lines of the clean drawing
    if chance(0.45):
        ink = _screen(ink, _strands(ink.shape, rng, strength))
    if chance(0.6):
        ink = _screen(ink, _spurious_strokes(ink.shape, clean_ink, rng, strength))
    if chance(0.4):
        ink = _screen(ink, _mottle(ink.shape, rng, strength))
    if chance(0.25):
        ink = _screen(ink, _hatching(ink.shape, rng, strength))
    if chance(0.2):
        ink = _screen(ink, _shading(ink.shape, rng, strength))
    if chance(0.35):
        ink = _screen(ink, _speckle(ink.shape, rng, strength))

    # paper, scan and print
    if chance(0.6):
        ink = _screen(ink, _paper(ink.shape, rng, strength))
    if chance(0.5):
        ink = _blur(ink, rng.uniform(0.3, 1.1))
    if chance(0.15):  # near-binary toner, as a photocopier prints
        level = rng.uniform(0.3, 0.6)
        ink = 1.0 / (1.0 + np.exp(-(ink - level) * rng.uniform(8, 25)))
    if chance(0.5):
        ink = np.clip(ink, 0, 1) ** rng.uniform(0.7, 1.4) * rng.uniform(0.75, 1.05)
    if chance(0.5):
        ink = ink + rng.normal(0, rng.uniform(0.01, 0.05) * strength, ink.shape).astype(np.float32)
    rough = np.clip(np.rint(255.0 * (1.0 - np.clip(ink, 0, 1))), 0, 255).astype(np.uint8)
    if chance(0.15):
        ok, data = cv2.imencode(".jpg", rough, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 85))])
        rough = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if ok else rough
    return rough


# ---------------------------------------------------------------------------- pairs


MIN_INK_FRACTION = 0.003
MAX_CROP_TRIES = 4


class RoughSketchGenerator:
    """Makes (rough, clean) training pairs, deterministic given `seed`.

    `pair(clean, size)` takes a random size x size crop of a clean sketch, scaled, rotated
    and flipped (the same geometry for both images), and degrades it; `procedural_pair(size)`
    does the same on a freshly drawn procedural sketch. A small fraction of pairs keeps the
    rough image (almost) clean, so clean input passes through unchanged.
    """

    def __init__(self, seed: int = 0, scale_range: tuple[float, float] = (0.7, 1.3),
                 strength_range: tuple[float, float] = (0.3, 1.1), identity_fraction: float = 0.07,
                 canvas_range: tuple[int, int] = (320, 640)):
        self.rng = np.random.default_rng(seed)
        self.scale_range = scale_range
        self.strength_range = strength_range
        self.identity_fraction = identity_fraction
        self.canvas_range = canvas_range

    def augment(self, clean: np.ndarray, size: int) -> np.ndarray:
        """A size x size view of `clean` at a random scale, rotation, flip and position
        (centred near ink when there is any); outside the image is paper."""
        rng = self.rng
        if clean.dtype != np.uint8 or clean.ndim != 2:
            raise ValueError(f"expected a uint8 HxW sketch, got {clean.dtype} with shape {clean.shape}")
        scale = float(np.exp(rng.uniform(*np.log(self.scale_range))))
        source = clean
        if scale < 1.0:  # shrink with area averaging, then only rotate
            source = cv2.resize(clean, (max(1, round(clean.shape[1] * scale)), max(1, round(clean.shape[0] * scale))),
                                interpolation=cv2.INTER_AREA)
            scale = 1.0
        if rng.random() < 0.5:
            source = source[:, ::-1]
        angle = rng.uniform(-180, 180) if rng.random() < 0.5 else rng.normal(0, 10)
        ys, xs = np.nonzero(source < 128)
        if len(xs) and rng.random() < 0.8:
            k = rng.integers(len(xs))
            centre = np.array([xs[k], ys[k]], np.float64) + rng.uniform(-size / 3, size / 3, 2) / scale
        else:
            centre = rng.uniform([0, 0], [source.shape[1], source.shape[0]])
        matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), float(angle), scale)
        matrix[:, 2] += np.array([size / 2, size / 2]) - centre
        return cv2.warpAffine(np.ascontiguousarray(source), matrix, (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=255)

    def degrade(self, clean: np.ndarray) -> np.ndarray:
        """A rough version of an already cropped clean sketch, at a random strength."""
        if self.rng.random() < self.identity_fraction:
            return degrade(clean, self.rng, strength=self.rng.uniform(0.0, 0.1))
        return degrade(clean, self.rng, strength=self.rng.uniform(*self.strength_range))

    def pair(self, clean: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(rough, clean) uint8 size x size crops from the clean sketch `clean`; a nearly
        blank crop is drawn again (a few times at most), as blank targets teach little."""
        for _ in range(MAX_CROP_TRIES):
            target = self.augment(clean, size)
            if np.count_nonzero(target < 128) >= MIN_INK_FRACTION * target.size:
                break
        return self.degrade(target), target

    def procedural_pair(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(rough, clean) from a procedural face-like drawing on a canvas as large as a
        512 px face sketch, give or take, so line widths and feature sizes match."""
        canvas = int(self.rng.integers(self.canvas_range[0], self.canvas_range[1] + 1))
        return self.pair(procedural_clean_lines(self.rng, max(canvas, size)), size)

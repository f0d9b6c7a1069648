"""Reading any face photo into 8-bit RGB, refusing what is not a usable image, and writing
images atomically.

Every refusal is an `ImageError` whose message is one line: the file, then the reason.
"""
from __future__ import annotations

import io
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

    Grayscale, palette, CMYK and 16-bit images are converted; transparency is composited
    on white (paper), which is what both photos and sketches expect behind them. Images over
    `max_pixels` are refused from their header, before any pixel is decoded.
    """
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # (a camera's damaged EXIF block: the pixels decode, the orientation is read where it can
        # be; Pillow's warning named no file and took two lines in a batch's output)
        warnings.filterwarnings("ignore", message=".*[Cc]orrupt EXIF", category=UserWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(path, "not an image (unrecognised file format)") from None
        except Image.DecompressionBombError:
            raise ImageError(path, f"image too large (over {MAX_PIXELS:,} pixels; possible decompression bomb)") from None
        except (OSError, SyntaxError, ValueError, EOFError, NotImplementedError) as error:
            raise _decode_error(path, error) from None
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(path, f"image too large ({width}x{height} > {max_pixels:,} pixels; possible decompression bomb)")
        if min(width, height) < MIN_SIDE:
            raise ImageError(path, f"image too small ({width}x{height}; need at least {MIN_SIDE} px a side)")
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, EOFError, NotImplementedError) as error:  # (NotImplementedError: a DDS variant)
            raise _decode_error(path, error) from None
    return _to_rgb8(image, path)


def _decode_error(path, error: BaseException) -> ImageError:
    reason = " ".join((str(error) or type(error).__name__).split())
    if "truncat" in reason.lower() or isinstance(error, EOFError):
        return ImageError(path, f"truncated or corrupt image data ({reason})")
    return ImageError(path, f"cannot decode image ({reason})")


def _to_rgb8(image: Image.Image, path) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        gray = np.asarray(image, dtype=np.float64)
        if np.isnan(gray).any():
            raise ImageError(path, "a floating-point image with NaN (undefined) values")
        # 16-bit and 32-bit integer images span 0..65535; float images 0..1.
        scale = 255.0 if mode == "F" and gray.max(initial=0) <= 1.0 else (1.0 if mode == "F" else 255.0 / 65535.0)
        gray = np.clip(np.rint(gray * scale), 0, 255).astype(np.uint8)
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

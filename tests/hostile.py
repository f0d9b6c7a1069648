"""Builds folders of hostile and awkward image files for the tests (nothing binary is
committed: every file is made here from the package sample photos or from scratch)."""
from __future__ import annotations

import errno
import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid little PNG whose header declares a gigantic size."""
    data = bytearray(_encode(Image.new("L", (8, 8)), "PNG"))
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data[8:33] = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return bytes(data)


def exif_rotated_jpeg(rgb: np.ndarray) -> bytes:
    """The photo stored lying on its side with EXIF orientation 6 (rotate 90 CW to view)."""
    stored = Image.fromarray(np.rot90(rgb, k=1))  # what a camera held sideways stores
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return _encode(stored, "JPEG", exif=exif, quality=92)


def good_variants(face: np.ndarray, prefix: str = "") -> dict[str, bytes]:
    """The same face photo (or RGB sketch) in every awkward-but-valid encoding a user may have."""
    image = Image.fromarray(face)
    rgba = image.convert("RGBA")
    rgba.putalpha(255)
    gray16 = (np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    variants = {
        "photo.webp": _encode(image, "WEBP", quality=90),
        "photo.bmp": _encode(image, "BMP"),
        "photo.tiff": _encode(image, "TIFF"),
        "gray.png": _encode(image.convert("L"), "PNG"),
        "gray16.png": _encode(Image.fromarray(gray16), "PNG"),
        "cmyk.jpg": _encode(image.convert("CMYK"), "JPEG", quality=92),
        "palette.png": _encode(image.quantize(colors=256), "PNG"),
        "rgba.png": _encode(rgba, "PNG"),
        "exif rotated.jpg": exif_rotated_jpeg(face),
        "naïve café ünïcode.jpg": _encode(image, "JPEG", quality=92),
    }
    return {prefix + name: data for name, data in variants.items()}


def palette_with_transparency(rgb: np.ndarray, border: int = 40) -> bytes:
    """A 255-colour palette PNG whose outer band is the transparent palette entry."""
    quantized = Image.fromarray(rgb).quantize(colors=255)
    indices = np.asarray(quantized).copy()
    indices[:border] = indices[-border:] = indices[:, :border] = indices[:, -border:] = 255
    image = Image.fromarray(indices, "P")
    image.putpalette(quantized.getpalette())
    return _encode(image, "PNG", transparency=255)


def side_by_side(*photos: np.ndarray, height: int = 512) -> np.ndarray:
    """Photos scaled to one height and joined left to right (a group photo)."""
    return np.concatenate([cv2.resize(p, (round(p.shape[1] * height / p.shape[0]), height)) for p in photos], axis=1)


def huge_jpeg(face: np.ndarray, size: tuple[int, int] = (12000, 9000), face_side: int = 4000) -> bytes:
    """A size[0] x size[1] JPEG, flat but for the photo scaled up in its middle (2 MB, 108 MP)."""
    width, height = size
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = (200, 190, 180)
    top, left = (height - face_side) // 2, (width - face_side) // 2
    canvas[top:top + face_side, left:left + face_side] = cv2.resize(face, (face_side, face_side))
    return _encode(Image.fromarray(canvas), "JPEG", quality=80)


def png(image: np.ndarray) -> bytes:
    return _encode(Image.fromarray(image), "PNG")


def bad_files(face: np.ndarray) -> dict[str, bytes]:
    """Files that must each be refused (or skipped) with one clear line."""
    jpeg = _encode(Image.fromarray(face), "JPEG", quality=92)
    png = _encode(Image.fromarray(face), "PNG")
    rng = np.random.default_rng(0)
    return {
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "truncated.png": png[: len(png) // 3],
        "text.jpg": b"this is not an image, just some text\n" * 20,
        "page.png": b"<!DOCTYPE html><html><body><p>saved web page</p></body></html>\n",
        "bomb.png": bomb_png(),
        "tiny.png": _encode(Image.new("RGB", (10, 10), (200, 150, 120)), "PNG"),
        "noise-no-face.png": _encode(Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)), "PNG"),
        "flat-no-face.jpg": _encode(Image.new("RGB", (300, 300), (240, 240, 240)), "JPEG"),
    }


SPECIAL_FILES = ("fifo.png", "zero.jpg")


def write_folder(folder: Path, files: dict[str, bytes], symlink_loop: bool = False, special: bool = False) -> Path:
    """Write `files`; optionally a self-link loop.jpg and a link back to the folder, and
    SPECIAL_FILES: a FIFO (reading it would block) and a link to /dev/zero (it never ends)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if symlink_loop:
        os.symlink("loop.jpg", folder / "loop.jpg")  # points at itself
        os.symlink(".", folder / "subdir-loop")  # a directory link back to the folder
    if special:
        os.mkfifo(folder / "fifo.png")
        os.symlink("/dev/zero", folder / "zero.jpg")
    return folder


@dataclass
class Tally:
    """What the hostile-input tests tried and found, summed over the session and printed at
    its end (tests/conftest.py): each count is added where a test makes the check."""

    tried: int = 0
    crashes: int = 0
    lost_or_corrupted: int = 0

    def line(self) -> str:
        return (f"hostile inputs tried: {self.tried}, crashes: {self.crashes}, "
                f"files lost or corrupted: {self.lost_or_corrupted}")


TALLY = Tally()


def write_face_variants(sample_photos: Path, folder: Path, per_photo: int) -> list[Path]:
    """`per_photo` distinct face photos from each package sample (turned, scaled, mirrored and
    brightened differently), as PNGs in `folder`: enough distinct faces for a batch test."""
    from dfd_data.image_io import read_image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("astronaut.png", "grace_hopper.jpg"):
        image = read_image(sample_photos / name)
        height, width = image.shape[:2]
        for index in range(per_photo):
            matrix = cv2.getRotationMatrix2D((width / 2, height / 2), (index % 5 - 2) * 4, 0.8 + 0.05 * index)
            variant = cv2.warpAffine(image, matrix, (width, height), borderMode=cv2.BORDER_REFLECT)
            variant = np.clip(variant[:, ::-1 if index % 2 else 1].astype(int) + 4 * (index - 6), 0, 255)
            path = folder / f"{Path(name).stem}-{index:02d}.png"
            cv2.imwrite(str(path), cv2.cvtColor(variant.astype(np.uint8), cv2.COLOR_RGB2BGR))
            written.append(path)
    return written


def fill_disk_after(monkeypatch, writes: int) -> None:
    """Every os.fsync after the first `writes` fails with ENOSPC, as writes do on a full disk
    (monkeypatch.undo() frees the disk again)."""
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

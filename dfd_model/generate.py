"""`dfd-model generate`: sketch files in, face PNGs out (and optional sketch | projection | face sheets).

Inputs of any size and format are read with dfd_data's image reader. A sketch that is not
square is letterboxed onto white paper, then resized to the model's resolution. A photo given
by mistake (colour, little white paper) is refused, or, when `from_photo` names a sketch
method, aligned like a training face and turned into a sketch with that method. One bad file
is reported on one line and never stops the others.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np
import torch
from tqdm import tqdm

from dfd_data.atomic import atomic_write_bytes
from dfd_data.contact_sheet import contact_sheet
from dfd_data.devices import precision_name
from dfd_data.errors import UserError
from dfd_data.image_io import ImageError, encode_jpeg, encode_png, is_image_name, read_image

from .networks import denormalize_image
from .sketch_to_face import SketchToFace

# A sketch is dark lines on paper: at least this share of near-white pixels ...
MIN_PAPER_FRACTION = 0.25
PAPER_LEVEL = 200
# ... and (almost) no colour: the mean spread between the RGB channels stays below this.
MAX_COLOUR_SPREAD = 12.0
# Photos given with --from-photo are aligned at this size (the sketch methods' tuning), then resized.
PHOTO_ALIGN_SIZE = 512
# The --grid sheet shows at most this many inputs (sketch | projected sketch | face each).
GRID_ROWS = 64


def photo_reason(image: np.ndarray) -> str | None:
    """Why an RGB image looks like a photo rather than a sketch, or None if it looks like a sketch.
    (OpenCV per-channel operations: numpy's reductions over the channel axis took seconds on
    a 100-megapixel photo.)"""
    red, green, blue = cv2.split(image)
    high, low = cv2.max(cv2.max(red, green), blue), cv2.min(cv2.min(red, green), blue)
    spread = cv2.mean(cv2.subtract(high, low))[0]
    if spread > MAX_COLOUR_SPREAD:
        return f"looks like a colour photo (mean channel spread {spread:.0f})"
    paper = cv2.countNonZero(cv2.compare(low, PAPER_LEVEL, cv2.CMP_GE)) / low.size
    if paper < MIN_PAPER_FRACTION:
        return f"looks like a photo, not a sketch (only {paper:.0%} of it is white paper)"
    return None


def letterbox(image: np.ndarray, resolution: int) -> np.ndarray:
    """A gray (or RGB) image resized so that its longer side is `resolution`, centred on a
    square of white paper that size. (Resized first: a 65536 x 256 strip, within the pixel
    limits, padded first would have been a 4 GiB square.)"""
    height, width = image.shape[:2]
    side = max(height, width)
    if side != resolution:
        scale = resolution / side
        interpolation = cv2.INTER_AREA if side > resolution else cv2.INTER_CUBIC
        image = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                           interpolation=interpolation)
        height, width = image.shape[:2]
    if height != width:
        square = np.full((resolution, resolution, *image.shape[2:]), 255, np.uint8)
        top, left = (resolution - height) // 2, (resolution - width) // 2
        square[top:top + height, left:left + width] = image
        image = square
    return image


def sketch_from_photo(image: np.ndarray, path, method_name: str, device: str, precision: str = "auto") -> np.ndarray:
    """Align the largest face of a photo and draw it with a dfd-data sketch method (its
    networks on `device` in `precision`)."""
    from dfd_data.faces import find_faces
    from dfd_data.ffhq_alignment import align_face, ffhq_quad
    from dfd_data.sketch_methods import resolve_method, run_method

    faces = find_faces(image)
    if not faces:
        raise ImageError(path, "no face found in the photo to turn into a sketch")
    aligned = align_face(image, ffhq_quad(faces[0].landmarks), PHOTO_ALIGN_SIZE)
    return run_method(resolve_method(method_name), [aligned], device=device, batch_size=1, precision=precision)[0]


FROM_PHOTO_HINT = "pass --from-photo METHOD (e.g. photocopy+simplify) to turn photos into sketches first"


def load_sketch(path: str | os.PathLike, resolution: int, from_photo: str | None = None,
                device: str = "cpu", precision: str = "auto", photo_hint: str = FROM_PHOTO_HINT) -> np.ndarray:
    """A sketch file as uint8 [R, R] (255 paper), or ImageError naming the file and the problem
    (for a photo: the problem, then `photo_hint`, what the caller's user can do about it)."""
    image = read_image(path)
    reason = photo_reason(image)
    if reason is not None:
        if from_photo is None:
            raise ImageError(path, f"{reason}; {photo_hint}")
        gray = sketch_from_photo(image, path, from_photo, device, precision)
    else:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return letterbox(gray, resolution)


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, and the image files directly inside given folders (sorted). Anything
    with an image name that is not a folder is kept, so that a broken link or a FIFO named
    .png is reported by the reader rather than silently left out."""
    found = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if not p.is_dir() and is_image_name(p.name))
        else:
            found.append(path)
    return found


def _output_names(paths: list[Path]) -> list[str]:
    """One distinct output name per input: its stem, or stem-2, stem-3 ... once that is taken
    (by an earlier input of the same stem, or by an input itself named like stem-2)."""
    stems = [path.stem for path in paths]
    reserved, used, names = set(stems), set(), []
    for stem in stems:
        name, number = stem, 1
        while name in used or (number > 1 and name in reserved):
            number += 1
            name = f"{stem}-{number}"
        used.add(name)
        names.append(name)
    return names


@dataclass
class GenerateResult:
    written: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    grid: Path | None = None
    grid_rows: int = 0  # the faces the grid shows: at most GRID_ROWS
    not_drawn: int | None = None  # inputs left when the run was interrupted (Ctrl-C)

    def line(self, seconds: float) -> str:
        failed = f", {len(self.errors)} failed" if self.errors else ""
        shown = f" (the first {self.grid_rows})" if self.grid_rows < len(self.written) else ""
        grid = f"; grid {self.grid}{shown}" if self.grid else ""
        stopped = "" if self.not_drawn is None else f"; interrupted, {self.not_drawn} not drawn"
        faces = f"{len(self.written)} face{'' if len(self.written) == 1 else 's'}"
        return f"generate: {faces}{failed} in {seconds:.1f} s{grid}{stopped}"


class GenerateInterrupted(KeyboardInterrupt):
    """Ctrl-C during `generate`: still a KeyboardInterrupt, so callers stop, carrying the run's
    result so far (its `not_drawn` counts the inputs left)."""

    def __init__(self, result: GenerateResult):
        super().__init__()
        self.result = result


def _check_outputs(paths: list[Path], targets: list[Path]) -> None:
    """Refuse a run that would write over one of its own inputs (OUT is an input folder)."""
    sources = {os.path.realpath(path): path for path in paths}  # (realpath: a symlink loop is an input too)
    for target in targets:
        source = sources.get(os.path.realpath(target))
        if source is not None:
            raise UserError(f"{target}: an output would replace the input {source}; choose another output folder")


def generate(model: SketchToFace, inputs: list[str], out: str | os.PathLike, *,
             refine: float | Mapping[str, float] = 1.0, gender: str | None = None, from_photo: str | None = None,
             batch_size: int = 4, grid: bool = False, quiet: bool = False) -> GenerateResult:
    """Write OUT/<input stem>.png for every readable sketch; see the module docstring. Inputs
    are read a batch at a time, and each batch's faces written before the next is read: an
    interrupted run keeps what it finished, and memory does not grow with the inputs. Ctrl-C
    raises GenerateInterrupted with the result so far (no grid, if the grid was not written yet)."""
    out = Path(out)
    paths = collect_inputs(inputs)
    if not paths:
        raise UserError(f"no image files in {', '.join(inputs)} (folders are read one level deep)")
    targets = [out / f"{name}.png" for name in _output_names(paths)]
    _check_outputs(paths, targets + ([out / "grid.jpg"] if grid else []))
    out.mkdir(parents=True, exist_ok=True)
    resolution = model.config.resolution
    device, precision = next(model.parameters()).device, precision_name(model.compute_dtype)
    result, tiles = GenerateResult(), []
    progress = tqdm(total=len(paths), desc="generate", unit="image", disable=quiet)
    try:
        for start in range(0, len(paths), batch_size):
            chunk = list(zip(paths[start:start + batch_size], targets[start:start + batch_size]))
            batch: list[tuple[Path, np.ndarray]] = []
            for path, target in chunk:
                try:
                    batch.append((target, load_sketch(path, resolution, from_photo, device.type, precision)))
                except (UserError, OSError) as error:
                    result.errors.append(str(error))
            if batch:
                sketches = torch.from_numpy(np.stack([sketch for _, sketch in batch]))
                with torch.inference_mode():
                    latents = model.encode(sketches, refine, gender)
                    faces = denormalize_image(model.synthesize(latents)).permute(0, 2, 3, 1).cpu().numpy()
                    drawn = denormalize_image(model.draw(latents))[:, 0].cpu().numpy() if grid else None
                for index, ((target, sketch), face) in enumerate(zip(batch, faces)):
                    try:
                        atomic_write_bytes(target, encode_png(face))
                    except UserError as error:  # (WriteError: this file cannot be written; the others may be)
                        result.errors.append(str(error))
                        continue
                    result.written.append(target)
                    if grid and len(tiles) < 3 * GRID_ROWS:
                        tiles += [sketch, drawn[index], face]
            progress.update(len(chunk))
        progress.close()  # (every face is written: the bar goes before the grid is made)
        if grid and tiles:
            sheet = contact_sheet(tiles, thumb=min(256, resolution), columns=3)
            try:
                atomic_write_bytes(out / "grid.jpg", encode_jpeg(sheet))
            except UserError as error:  # (the faces are written: a sheet that cannot be is one more error)
                result.errors.append(str(error))
            else:
                result.grid, result.grid_rows = out / "grid.jpg", len(tiles) // 3
    except KeyboardInterrupt:  # (while the grid is made too: the faces are written, the summary says so)
        result.not_drawn = len(paths) - len(result.written) - len(result.errors)
        raise GenerateInterrupted(result) from None
    finally:
        progress.close()
    return result


__all__ = ["GenerateInterrupted", "GenerateResult", "collect_inputs", "generate", "letterbox", "load_sketch", "photo_reason"]

"""The `demo` recipe: from a handful of portrait photos to generated faces in minutes on a CPU.

Photos come from installed or registry packages only (matplotlib's grace_hopper.jpg,
scikit-image's astronaut, and the portraits in the face_recognition 1.3.0 source
distribution, fetched once with `pip download` into $DFD_HOME/downloads), or from a folder
the user passes. The recipe aligns them, draws photocopy+simplify sketches, crops the
components, trains both stages of a small 128 px model, makes rough hand-drawn-looking copies
of the sketches with the simplifier's degradation generator, generates faces from both
(rough ones fully projected and as drawn), and writes report.html.
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from dfd_data.atomic import atomic_write_bytes
from dfd_data.dataset import MANIFEST_NAME
from dfd_data.image_io import encode_png, is_image_name, read_image
from dfd_data.samples import write_samples
from dfd_data.weights import dfd_home

from .runner import Step

FACE_RECOGNITION_SDIST = "face_recognition==1.3.0"
SDIST_NAME = "face_recognition-1.3.0.tar.gz"
SDIST_IMAGES = "face_recognition-1.3.0/tests/test_images/"
SKETCHES = "photocopy+simplify"
# A small model that trains both stages in a few minutes on 2 cores and still shows faces.
DEMO_MODEL = {"latent_dim": 128, "ce_base_channels": 8, "fm_base_channels": 8, "ngf": 16, "n_blocks": 4, "ndf": 32}
DEMO_STEPS = 400
ROUGH_SEED = 7


def _download_sdist(cache: Path, echo) -> Path | None:
    target = cache / SDIST_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", FACE_RECOGNITION_SDIST,
               "-d", str(cache), "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not target.is_file():
        reason = " ".join((result.stderr or "no output").split())[-200:]
        echo(f"    could not fetch {FACE_RECOGNITION_SDIST} with pip download ({reason}); the demo goes on with "
             "the two photos that ship in matplotlib and scikit-image")
        return None
    return target


def gather_demo_photos(folder: Path, echo=print) -> list[Path]:
    """Write the demo photos into `folder`: the two package samples plus the face_recognition
    test portraits, read out of the sdist (pip download prepares the sdist's metadata, which
    runs its setup.py in an isolated build environment; nothing from it is installed)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = write_samples(folder)
    sdist = _download_sdist(dfd_home() / "downloads", echo)
    if sdist is not None:
        try:
            with tarfile.open(sdist, "r:gz") as archive:
                for member in archive.getmembers():
                    name = member.name[len(SDIST_IMAGES):]
                    if member.isfile() and member.name.startswith(SDIST_IMAGES) and "/" not in name \
                            and is_image_name(name):
                        target = folder / f"face_recognition_{name}"
                        atomic_write_bytes(target, archive.extractfile(member).read())
                        written.append(target)
        except (tarfile.TarError, EOFError, OSError) as error:  # a download cut short: fetched again next time
            sdist.unlink(missing_ok=True)
            echo(f"    {sdist}: unreadable ({' '.join(str(error).split()) or type(error).__name__}), deleted; the demo "
                 "goes on with the photos read so far (rerun to fetch it again)")
    echo(f"    {len(written)} photos in {folder}")
    return written


def write_rough_sketches(sketches: Path, out: Path, seed: int = ROUGH_SEED) -> int:
    """A rough, hand-drawn-looking copy of every sketch (the simplifier's degradations)."""
    from dfd_data.rough_sketches import degrade

    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for index, path in enumerate(sorted(p for p in sketches.iterdir() if p.suffix == ".png")):
        clean = read_image(path)[:, :, 0]
        rough = degrade(clean, np.random.default_rng([seed, index]), strength=0.8)
        atomic_write_bytes(out / path.name, encode_png(rough))
        count += 1
    return count


def demo_steps(out: Path, photos: Path | None = None, steps: int = DEMO_STEPS, echo=print) -> list[Step]:
    from .report import write_report

    faces, run, rough = out / "faces", out / "run", out / "rough"
    photo_folder = photos if photos is not None else out / "photos"
    sketch_folder = faces / "sketches" / SKETCHES
    model_settings = [arg for key, value in DEMO_MODEL.items() for arg in ("--set", f"{key}={value}")]
    model = str(run / "model")
    result = [
        Step("align", "find, landmark and FFHQ-align the faces (256 px)",
             ["dfd-data", "align", str(photo_folder), str(faces), "--size", "256"], outputs=[faces / "records.jsonl"],
             partial_ok=True, state=faces / MANIFEST_NAME),
        Step("build-sketches", f"draw {SKETCHES} sketches", ["dfd-data", "build-sketches", str(faces)],
             outputs=[sketch_folder], partial_ok=True, state=faces / MANIFEST_NAME),
        Step("crop-components", "cut the five component windows",
             ["dfd-data", "crop-components", str(faces)], outputs=[faces / "components"], partial_ok=True,
             state=faces / MANIFEST_NAME),
        Step("train", f"train both stages at 128 px, {steps} steps each",
             ["dfd-model", "train", str(faces), "--stage", "all", "--resolution", "128", "--steps", str(steps),
              "--batch-size", "4", "--log-every", "10", "--grid-every", str(max(1, steps // 4)),
              "--checkpoint-every", "100", "--out", str(run), "--resume", *model_settings],
             outputs=[run / "model" / "config.json"]),
        Step("rough-sketches", "roughen the sketches as a hasty hand would draw them",
             function=lambda: write_rough_sketches(sketch_folder, rough), outputs=[rough]),
        Step("generate", "faces from the training sketches",
             ["dfd-model", "generate", "--model", model, str(sketch_folder), "-o", str(out / "generated" / "sketches"),
              "--grid"], outputs=[out / "generated" / "sketches" / "grid.jpg"], partial_ok=True),
        Step("generate-rough", "faces from the rough sketches, projected onto the training sketches",
             ["dfd-model", "generate", "--model", model, str(rough), "-o", str(out / "generated" / "rough"), "--grid"],
             outputs=[out / "generated" / "rough" / "grid.jpg"], partial_ok=True),
        Step("generate-rough-raw", "faces from the rough sketches as drawn (refine 0)",
             ["dfd-model", "generate", "--model", model, str(rough), "-o", str(out / "generated" / "rough-raw"),
              "--grid", "--refine", "0"], outputs=[out / "generated" / "rough-raw" / "grid.jpg"], partial_ok=True),
        Step("report", "write report.html", function=lambda: write_report(out, "demo"),
             outputs=[out / "report.html"]),
    ]
    if photos is None:
        result.insert(0, Step("photos", "gather portrait photos from installed and registry packages",
                              function=lambda: gather_demo_photos(photo_folder, echo), outputs=[photo_folder]))
    return result


__all__ = ["demo_steps", "gather_demo_photos", "write_rough_sketches"]

"""The full-size recipes: `folder` (any folder of face photos) and `celebamask-hq` (a user's
copy of CelebAMask-HQ, frontal faces only, gender from CelebA's `Male` attribute).

Both align at 512, draw photocopy+simplify sketches, crop components and train the released
512 model (both stages, 50,000 steps each by default) into OUT/run; the report closes the
run. On a GPU machine the same command uses CUDA (`--device auto`); on several GPUs run the
training step under torchrun as the README shows.
"""
from __future__ import annotations

import os
from pathlib import Path

from dfd_data.atomic import atomic_write_text
from dfd_data.dataset import MANIFEST_NAME
from dfd_data.errors import UserError

from .runner import Step

# CelebAMask-HQ's pose file gives yaw and pitch in degrees; the paper kept ~17K of 30K faces
# as frontal. These limits keep faces turned at most this far.
MAX_YAW = 15.0
MAX_PITCH = 15.0
# Share of the selected faces held out as the test split (the paper: 842 of 17,702).
TEST_EVERY = 20


class RecipeError(UserError):
    """Input for a recipe that cannot be used; one line."""


def _read_celeba_table(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """CelebA-style annotation: a count line, a header line, then `<file> <values...>` rows."""
    if not path.is_file():
        raise RecipeError(f"{path}: not found (expected in a CelebAMask-HQ folder)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None
    if len(lines) < 3:
        raise RecipeError(f"{path}: too short to be a CelebA annotation file")
    header = lines[1].split()
    rows = {}
    for number, line in enumerate(lines[2:], 3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(header) + 1:
            raise RecipeError(f"{path}: line {number} has {len(fields) - 1} values, the header names {len(header)}")
        rows[fields[0]] = fields[1:]
    return header, rows


def select_celebamask(root: Path, out: Path) -> int:
    """Link the frontal photos of CelebAMask-HQ into out/photos and write out/labels.csv
    (file, gender, split). Returns the number selected."""
    images = root / "CelebA-HQ-img"
    if not images.is_dir():
        raise RecipeError(f"{root}: has no CelebA-HQ-img/ folder; pass the CelebAMask-HQ folder itself")
    pose_header, poses = _read_celeba_table(root / "CelebAMask-HQ-pose-anno.txt")
    attribute_header, attributes = _read_celeba_table(root / "CelebAMask-HQ-attribute-anno.txt")
    if "Male" not in attribute_header or "Yaw" not in pose_header or "Pitch" not in pose_header:
        raise RecipeError(f"{root}: the annotation files lack a Male, Yaw or Pitch column")
    yaw, pitch, male = pose_header.index("Yaw"), pose_header.index("Pitch"), attribute_header.index("Male")

    def frontal(name: str, values: list[str]) -> bool:
        try:
            return abs(float(values[yaw])) <= MAX_YAW and abs(float(values[pitch])) <= MAX_PITCH
        except ValueError:
            raise RecipeError(f"{root / 'CelebAMask-HQ-pose-anno.txt'}: {name}: yaw {values[yaw]!r} or pitch "
                              f"{values[pitch]!r} is not a number") from None

    chosen = sorted((name for name, values in poses.items()
                     if frontal(name, values) and name in attributes and (images / name).is_file()),
                    key=lambda name: (len(name), name))
    if not chosen:
        raise RecipeError(f"{root}: no photo has |yaw| <= {MAX_YAW} and |pitch| <= {MAX_PITCH}")
    photos = out / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    kept = set(chosen)
    for link in photos.iterdir():  # links of an earlier selection (another copy, or other limits)
        if link.is_symlink() and (link.name not in kept or os.readlink(link) != str((images / link.name).resolve())):
            link.unlink()
    rows = ["file,gender,split"]
    for index, name in enumerate(chosen):
        link = photos / name
        if not link.is_symlink():
            os.symlink((images / name).resolve(), link)
        gender = "male" if attributes[name][male] == "1" else "female"
        rows.append(f"{name},{gender},{'test' if index % TEST_EVERY == TEST_EVERY - 1 else 'train'}")
    atomic_write_text(out / "labels.csv", "\n".join(rows) + "\n")
    return len(chosen)


def full_size_steps(out: Path, photos: Path, *, labels: Path | None = None, steps: int = 50_000,
                    batch_size: int, jobs: int = 2, extra_first: list[Step] | None = None) -> list[Step]:
    from .report import write_report

    faces, run = out / "faces", out / "run"
    result = list(extra_first or [])
    result.append(Step("align", "find, landmark and FFHQ-align the faces (512 px)",
                       ["dfd-data", "align", str(photos), str(faces), "--size", "512", "--jobs", str(jobs)],
                       outputs=[faces / "records.jsonl"], partial_ok=True,
                       state=faces / MANIFEST_NAME))
    if labels is not None:
        result.append(Step("label", "attach gender and split", ["dfd-data", "label", str(faces), str(labels)],
                           outputs=[faces / "records.jsonl"], state=faces / MANIFEST_NAME))
    result += [
        # (its network uses every core in one process: --jobs would change nothing)
        Step("build-sketches", "draw photocopy+simplify sketches", ["dfd-data", "build-sketches", str(faces)],
             outputs=[faces / "sketches" / "photocopy+simplify"], partial_ok=True, state=faces / MANIFEST_NAME),
        Step("crop-components", "cut the five component windows",
             ["dfd-data", "crop-components", str(faces), "--jobs", str(jobs)], outputs=[faces / "components"],
             partial_ok=True, state=faces / MANIFEST_NAME),
        Step("train", f"train the 512 model, {steps} steps per stage",
             ["dfd-model", "train", str(faces), "--stage", "all", "--steps", str(steps), "--batch-size",
              str(batch_size), "--out", str(run), "--resume"], outputs=[run / "model" / "config.json"]),
        Step("report", "write report.html", function=lambda: write_report(out, "full-size"),
             outputs=[out / "report.html"]),
    ]
    return result


def celebamask_steps(out: Path, root: Path, **options) -> list[Step]:
    select = Step("select", f"frontal faces (|yaw|, |pitch| <= {MAX_YAW:g} deg) and genders of CelebAMask-HQ",
                  function=lambda: select_celebamask(root, out), outputs=[out / "photos", out / "labels.csv"],
                  key=str(root.resolve()))
    return full_size_steps(out, out / "photos", labels=out / "labels.csv", extra_first=[select], **options)


__all__ = ["celebamask_steps", "full_size_steps", "select_celebamask"]

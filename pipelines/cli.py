"""`dfd-pipeline`: run an end-to-end recipe with one command."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from dfd_data import __version__
from dfd_data.cli import UserErrorGroup

RECIPES = ("demo", "folder", "celebamask-hq")
# The full-size recipes' training batch (per process): sized for a GPU.
FULL_SIZE_BATCH = 8


@click.group(cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="dfd-pipeline")
def main():
    """End-to-end DeepFaceDrawing recipes: photos in, trained model, generated faces and a report out."""


@main.command(epilog="""\b
Recipes:
  demo           the package sample portraits (or --photos), a 128 px model trained in minutes
                 on a CPU, faces from clean and rough sketches, report.html
  folder         --photos FOLDER at full size: align 512, sketches, crops, the 512 model
  celebamask-hq  --celebamask ROOT (CelebA-HQ-img/ and the pose and attribute files): frontal
                 faces, gender from CelebA's Male attribute, then as `folder`
\b
Examples:
  dfd-pipeline run demo --out demo-out
  dfd-pipeline run folder --photos ~/portraits --out runs/portraits --steps 20000
  dfd-pipeline run folder --photos ~/portraits --out runs/cpu-try --batch-size 2
  dfd-pipeline run celebamask-hq --celebamask /data/CelebAMask-HQ --out runs/celeba""")
@click.argument("name", type=click.Choice(RECIPES))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for everything the run makes.")
@click.option("--photos", type=click.Path(file_okay=False, exists=True), default=None,
              help="Folder of face photos (demo: instead of the package samples; folder: required).")
@click.option("--celebamask", type=click.Path(file_okay=False, exists=True), default=None,
              help="The CelebAMask-HQ folder (celebamask-hq recipe).")
@click.option("--labels", type=click.Path(dir_okay=False, exists=True), default=None,
              help="folder recipe: a CSV/TSV/JSON of gender and split per photo (see dfd-data label).")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="Training steps per stage (demo: 400, full size: 50,000).")
@click.option("--jobs", type=click.IntRange(1), default=None,
              help="Processes for align and crop-components (folder and celebamask-hq; default 2).")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help=f"Training batch (folder and celebamask-hq; default {FULL_SIZE_BATCH}). At 512 px a batch of 2 "
                   "peaks at about 16 GB on a CPU; if training is killed for memory before its first "
                   "checkpoint, rerun with a smaller one.")
def run(name, out, photos, celebamask, labels, steps, jobs, batch_size):
    """Run recipe NAME into OUT; rerunning the same command skips finished steps and resumes the rest."""
    from .demo import DEMO_STEPS, demo_steps
    from .full_size import celebamask_steps, full_size_steps
    from .runner import run_pipeline

    given = {"--photos": photos, "--celebamask": celebamask, "--labels": labels, "--jobs": jobs,
             "--batch-size": batch_size}
    takes = {"demo": ("--photos",), "folder": ("--photos", "--labels", "--jobs", "--batch-size"),
             "celebamask-hq": ("--celebamask", "--jobs", "--batch-size")}[name]
    unused = [option for option, value in given.items() if value is not None and option not in takes]
    if unused:  # an option the recipe would silently ignore
        raise click.UsageError(f"the {name} recipe does not take {', '.join(unused)} (it takes {', '.join(takes)})")
    jobs, batch_size = jobs or 2, batch_size or FULL_SIZE_BATCH
    out_path = Path(out)
    for option, folder in (("--photos", photos), ("--celebamask", celebamask)):
        if folder is not None and _inside(out_path, Path(folder)):  # its grids and faces would be taken for photos
            raise click.UsageError(f"--out {out} is inside {option} {folder}; put the run's folder elsewhere")
    if name == "demo":
        plan = demo_steps(out_path, Path(photos) if photos else None, steps or DEMO_STEPS, echo=click.echo)
    elif name == "folder":
        if photos is None:
            raise click.UsageError("the folder recipe needs --photos FOLDER")
        plan = full_size_steps(out_path, Path(photos), labels=Path(labels) if labels else None,
                               steps=steps or 50_000, jobs=jobs, batch_size=batch_size)
    else:
        if celebamask is None:
            raise click.UsageError("the celebamask-hq recipe needs --celebamask ROOT")
        plan = celebamask_steps(out_path, Path(celebamask), steps=steps or 50_000, jobs=jobs,
                                batch_size=batch_size)
    manifest = run_pipeline(name, plan, out_path, echo=click.echo)
    ran = sum(1 for step in manifest["steps"] if not step.get("skipped"))
    report = out_path / "report.html"
    partial = [step["name"] for step in manifest["steps"] if step["status"] == "partial"]
    failed_files = (f"; some files failed in {', '.join(partial)} (named above; the data steps' also in "
                    f"{out_path / 'faces' / 'errors.jsonl'})") if partial else ""
    click.echo(f"pipeline {name}: {ran} steps run, {len(plan) - ran} skipped in {manifest['total_seconds']:.0f} s; "
               f"report {report.resolve()}{failed_files}")
    if partial:
        sys.exit(1)


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it (links resolved)."""
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents

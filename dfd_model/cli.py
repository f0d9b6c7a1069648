"""`dfd-model`: train DeepFaceDrawing and generate faces from sketches."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import click
from click.core import ParameterSource
import torch
import yaml

from . import __version__
from dfd_data.cli import UserErrorGroup, parse_settings
from dfd_data.devices import DEVICE_CHOICES, PRECISIONS, precision_name, resolve_device, resolve_precision
from dfd_data.errors import DeviceError

# Inference precision of generate, evaluate and serve (see dfd_data.devices.resolve_precision).
precision_option = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto",
    help="auto: bf16 where the hardware computes it natively (AMX CPUs, CUDA), else fp32 (float32 everywhere, TF32 off on CUDA).")


class _OneVoiceGroup(UserErrorGroup):
    """Under torchrun every process reads the same command line: a refusal of it (an unknown
    option, a dataset that is not there) is said by rank 0 with the usage, and by the first
    process of each other machine in one line after its rank (its files may differ: a dataset
    on storage that machine lacks), as missing devices are; the other processes end with its
    status without a word (each had printed it)."""

    def main(self, *args, **kwargs):
        from .distributed import launched_local_rank, launched_rank

        rank = launched_rank()
        if rank == 0 or kwargs.get("standalone_mode") is False:
            return super().main(*args, **kwargs)
        try:
            result = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.UsageError as error:
            asked_for_help = type(error).__name__ == "NoArgsIsHelpError"  # (no command: the help, as the usage)
            if launched_local_rank() == 0 and not asked_for_help:
                click.echo(f"Error: rank {rank}: {error.format_message()}", err=True)
            raise SystemExit(error.exit_code) from None
        except click.ClickException as error:  # (what the process met itself: said as it would be alone)
            error.show()
            raise SystemExit(error.exit_code) from None
        except click.Abort:
            raise SystemExit(130) from None
        raise SystemExit(result if isinstance(result, int) else 0)


@click.group(cls=_OneVoiceGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="dfd-model")
def main():
    """Train the two-stage DeepFaceDrawing model and turn sketches into faces."""


@main.command()
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", help="Device to report on.")
def env(device):
    """Print the torch build, the device that --device picks, the CPU threads in use, and the
    precision `--precision auto` infers in on that device."""
    try:
        chosen = resolve_device(device)
    except DeviceError as error:
        raise click.ClickException(str(error)) from None
    detail = f" ({torch.cuda.get_device_name(chosen)})" if chosen.type == "cuda" else ""
    precision = precision_name(resolve_precision("auto", chosen))
    click.echo(f"torch {torch.__version__}; device {chosen}{detail}; {torch.get_num_threads()} CPU threads; "
               f"CUDA devices: {torch.cuda.device_count()}; inference precision (auto): {precision}")


def _number(text: str) -> int | float | None:
    """`text` as an int or a float where it is one: YAML 1.1 reads 1e-6 (no dot) as a string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None


def _split_settings(settings: tuple[str, ...]) -> tuple[dict, dict]:
    """--set KEY=VALUE pairs -> (ModelConfig fields, TrainConfig fields), values parsed as YAML
    scalars (numbers, true/false, null)."""
    from .config import ModelConfig
    from .training import TrainConfig

    model_keys = {f.name for f in fields(ModelConfig)}
    train_keys = {f.name for f in fields(TrainConfig)}
    model, training = {}, {}
    for key, text in parse_settings(settings).items():
        value = _number(text)
        if value is None:
            try:
                value = yaml.safe_load(text) if text else None
            except yaml.YAMLError:
                value = text
        if key in model_keys:
            model[key] = value
        elif key in train_keys:
            training[key] = value
        else:
            raise click.BadParameter(f"unknown setting {key!r}; model settings: {', '.join(sorted(model_keys))}; "
                                     f"training settings: {', '.join(sorted(train_keys))}", param_hint="--set")
    return model, training


@main.command(epilog="""\b
Examples:
  dfd-model train data/faces --stage all --resolution 128 --steps 20 --batch-size 4 --out runs/smoke
  dfd-model train data/faces --out runs/celeba-512 --device cuda          # the full 512 model
  dfd-model train data/faces --out runs/celeba-512 --resume               # after an interruption
  dfd-model train data/faces --resolution 256 --set ngf=32 --set l1_weight=0
  torchrun --nproc-per-node 4 -m dfd_model train data/faces --out runs/celeba-512 --device cuda""")
@click.argument("dataset", type=click.Path(file_okay=False, exists=True))
@click.option("--stage", type=click.Choice(["1", "2", "all"]), default="all",
              help="1: component auto-encoders and feature banks; 2: feature decoders, generator and "
                   "discriminators (needs stage 1 in the same run folder); all: both.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder. Default: the next free runs/run-NNN (with --resume: the latest one).")
@click.option("--resume", is_flag=True, help="Continue the run in --out (or the latest runs/run-NNN) from its latest "
              "checkpoint, with its own settings: options given again must match them, except --steps, --lr, the "
              "--*-every ones and --set amp.")
@click.option("--resolution", type=int, default=512, help="Side of sketches and faces (multiple of 32, >= 64).")
@click.option("--steps", type=click.IntRange(1), default=50_000, help="Optimisation steps per stage.")
@click.option("--batch-size", type=click.IntRange(1), default=8)
@click.option("--lr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=2e-4, help="Adam learning rate.")
@click.option("--sketches", default=None,
              help="Sketch set under DATASET/sketches to train on. Default: photocopy+simplify, or the only one.")
@click.option("--vgg-weights", type=click.Path(dir_okay=False, exists=True), default=None,
              help="torchvision VGG19 weights saved as safetensors; enables the perceptual loss.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Any ModelConfig or TrainConfig field (repeatable), e.g. --set ngf=32.")
@click.option("--log-every", type=click.IntRange(1), default=50, help="Steps per stats.jsonl row.")
@click.option("--grid-every", type=click.IntRange(1), default=1000, help="Steps between validation grids.")
@click.option("--checkpoint-every", type=click.IntRange(1), default=1000, help="Steps between checkpoints.")
@click.option("--seed", type=click.IntRange(0, 2 ** 63 - 1), default=0)
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(dataset, stage, out, resume, resolution, steps, batch_size, lr, sketches, vgg_weights, settings,
          log_every, grid_every, checkpoint_every, seed, device, quiet):
    """Train DeepFaceDrawing on a dataset made by dfd-data (aligned faces, sketches, labels).
    Runs unchanged under `torchrun --nproc-per-node N -m dfd_model train ...` (one process per
    GPU, or gloo on CPUs): --batch-size is then per process.

    The run folder receives train_config.json (written before any work), stats.jsonl, grids/
    (validation sheets), checkpoints/ and model/ (the SketchToFace folder that `dfd-model
    generate` loads). Faces labelled split=val or test are held out for the grids; banks are
    split by gender when the dataset records it.
    """
    from dfd_data.errors import UserError

    from . import distributed
    from .config import ModelConfig
    from .training import TrainConfig, Trainer, latest_run_folder, next_run_folder

    model_settings, train_settings = _split_settings(settings)
    try:
        model_config = ModelConfig.from_dict({"resolution": resolution, **model_settings})
        train_config = TrainConfig.from_dict({
            "steps": steps, "batch_size": batch_size, "lr": lr, "sketches": sketches, "vgg_weights": vgg_weights,
            "log_every": log_every, "grid_every": grid_every, "checkpoint_every": checkpoint_every, "seed": seed,
            **train_settings})
    except (TypeError, ValueError) as error:
        raise click.BadParameter(str(error)) from None
    run_folder = Path(out) if out else (latest_run_folder if resume else next_run_folder)(Path("runs"))
    if run_folder is None:  # (a fresh folder would have started a new run with the default settings)
        raise click.UsageError("--resume without --out resumes the latest runs/run-NNN, and there is none here; "
                               "name the run's folder with --out")
    try:
        trainer = Trainer(dataset, run_folder, model_config, train_config, resolve_device(device), resume=resume,
                          given=_given_settings(model_settings, train_settings), stage=stage, quiet=quiet,
                          echo=click.echo)
        try:
            trainer.echo(trainer.describe())
            summary = trainer.run(stage)
            trainer.echo(summary)
        finally:
            trainer.close()
    except UserError as error:
        rank = distributed.launched_rank()
        if rank == 0:
            raise
        # under torchrun rank 0 reports what every process met; another rank only what it alone met
        # (a missing device, met before the processes connect, by the first process of its machine)
        node_wide = isinstance(error, DeviceError) and distributed.launched_local_rank() != 0
        if not isinstance(error, distributed.OtherRankFailed) and not node_wide:
            click.echo(f"Error: rank {rank}: {error}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C reaches every process: rank 0 alone says so
        if distributed.launched_rank() == 0:
            click.echo(f"Aborted! (--out {run_folder} --resume continues the run from its latest checkpoint)", err=True)
        raise SystemExit(130) from None  # (the shell's code for a run stopped by Ctrl-C, as generate's)
    except RuntimeError as error:  # a collective that found another process gone or stalled: one line, not a traceback
        waited = distributed.timed_out(error)
        if distributed.launched_world() <= 1 or (waited is None and not distributed.lost_peer(error)):
            raise
        # (a process other than rank 0 that Ctrl-C stopped exits without a word: see above)
        cause = ("has ended (see its error; one stopped by Ctrl-C or a signal prints none)" if waited is None
                 else f"did not take its part within {waited:g} min (stalled?)")
        click.echo(f"Error: rank {distributed.launched_rank()}: stopped: another process of the run {cause}: "
                   f"{' '.join(str(error).split())}", err=True)
        raise SystemExit(1) from None


def _given_settings(model_settings: dict, train_settings: dict) -> set[str]:
    """The configuration keys this command line sets: its options not left at their defaults,
    and its --set keys (a resumed run keeps its own value of every other setting)."""
    context = click.get_current_context()
    options = ("resolution", "steps", "batch_size", "lr", "sketches", "vgg_weights", "log_every", "grid_every",
               "checkpoint_every", "seed")
    return {name for name in options if context.get_parameter_source(name) is not ParameterSource.DEFAULT} \
        | set(model_settings) | set(train_settings)


def _check_gender(model, gender: str | None) -> None:
    """A usage error unless `gender` is None or one of the model's banks' genders."""
    from .projection import ALL

    if gender is None or gender in model.genders:
        return
    if set(model.genders) <= {ALL}:  # (the help for an unsplit model had named its one bank, "all")
        raise click.BadParameter(f"{gender!r}: the model's banks are not split by gender (its dataset recorded none)",
                                 param_hint="--gender")
    raise click.BadParameter(f"{gender!r} is not one of the model's genders ({', '.join(model.genders)})",
                             param_hint="--gender")


def _load_model(folder: str, device: str, precision: str):
    """The model in `folder`, prepared for inference; a model saved after stage 1 only is
    loaded with a warning (its faces are an untrained generator's)."""
    from .checkpoint import untrained_warning
    from .sketch_to_face import SketchToFace

    model = SketchToFace.from_pretrained(folder, device=device, precision=precision)
    warning = untrained_warning(folder)
    if warning:
        click.echo(warning, err=True)
    return model


def _parse_refine(values: tuple[str, ...]) -> float | dict[str, float]:
    """--refine 0.5 (all components) and/or --refine nose=0.2 (one component) -> refine argument."""
    from dfd_data.components import COMPONENTS

    overall, per_component = 1.0, {}
    for value in values:
        name, sep, number = value.rpartition("=")
        try:
            amount = float(number)
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected a number or COMPONENT=NUMBER", param_hint="--refine") from None
        if not 0.0 <= amount <= 1.0:
            raise click.BadParameter(f"{value!r}: refinement must be within 0..1", param_hint="--refine")
        if not sep:
            overall = amount
        elif name in COMPONENTS:
            per_component[name] = amount
        else:
            raise click.BadParameter(f"{value!r}: unknown component {name!r} (known: {', '.join(COMPONENTS)})",
                                     param_hint="--refine")
    if not per_component:
        return overall
    return {name: per_component.get(name, overall) for name in COMPONENTS}


@main.command(epilog="""\b
Examples:
  dfd-model generate --model runs/run-001/model my_sketch.png -o faces/
  dfd-model generate --model runs/run-001/model sketches/ -o faces/ --refine 0.5 --refine mouth=1 --grid
  dfd-model generate --model runs/run-001/model photo.jpg -o faces/ --from-photo photocopy+simplify""")
@click.option("--model", "model_folder", required=True, type=click.Path(file_okay=False, exists=True),
              help="A model folder (a training run's model/).")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Folder for the faces.")
@click.option("--refine", "refine", multiple=True, metavar="X|COMPONENT=X",
              help="How far to pull each component towards the training sketches: 0 = as drawn, 1 = fully "
                   "projected (default 1). Repeat with COMPONENT=X (left_eye, right_eye, nose, mouth, "
                   "remainder) to override one component.")
@click.option("--gender", default=None, help="Search only this gender's bank (as the model's banks name them).")
@click.option("--from-photo", default=None, metavar="METHOD",
              help="Accept photos: align each and draw it with this dfd-data sketch method first.")
@click.option("--grid", is_flag=True, help="Also write grid.jpg: sketch | projected sketch | face per input "
                                         "(the first 64).")
@click.option("--batch-size", type=click.IntRange(1), default=4)
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto")
@precision_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
def generate(model_folder, inputs, out, refine, gender, from_photo, grid, batch_size, device, precision, quiet):
    """Turn sketches (files or folders of images, any size; white paper, dark lines) into faces,
    written to OUT as <input name>.png. Non-square sketches are letterboxed on white."""
    import time

    from dfd_data.sketch_methods import METHODS
    from .generate import GenerateInterrupted, generate as run

    if from_photo is not None and from_photo not in METHODS:
        raise click.BadParameter(f"unknown sketch method {from_photo!r} (known: {', '.join(METHODS)})",
                                 param_hint="--from-photo")
    if from_photo is not None and "hed" in from_photo:  # (once, up front: it had been said for every file, unnamed)
        from dfd_data.weights import hed_weights_path

        hed_weights_path()
    refine_value = _parse_refine(refine)
    started = time.time()
    model = _load_model(model_folder, device, precision)
    _check_gender(model, gender)
    try:
        result = run(model, list(inputs), out, refine=refine_value, gender=gender, from_photo=from_photo,
                     batch_size=batch_size, grid=grid, quiet=quiet)
    except GenerateInterrupted as interrupted:  # Ctrl-C: the summary of what was done, exit code 130
        result = interrupted.result
    for line in result.errors:
        click.echo(line, err=True)
    click.echo(result.line(time.time() - started))
    if result.not_drawn is not None:
        raise SystemExit(130)  # (the shell's code for a run stopped by Ctrl-C)
    if result.errors:
        raise SystemExit(1)


@main.command(epilog="""\b
Example:
  dfd-model evaluate --model runs/run-001/model --pairs heldout/ --out runs/run-001/evaluation""")
@click.option("--model", "model_folder", required=True, type=click.Path(file_okay=False, exists=True),
              help="A model folder (a training run's model/).")
@click.option("--pairs", required=True, type=click.Path(file_okay=False, exists=True),
              help="Folder with sketches/<name>.* and photos/<name>.* (aligned like training faces).")
@click.option("--out", default="evaluation", type=click.Path(file_okay=False),
              help="Folder for metrics.json, grid.jpg and faces/.")
@click.option("--refine", type=click.FloatRange(0, 1), default=1.0, help="Refinement for every component.")
@click.option("--gender", default=None, help="Search only this gender's bank.")
@click.option("--sketch-method", default="photocopy", help="dfd-data method that re-draws the generated faces.")
@click.option("--tol", type=click.FloatRange(0, min_open=True), default=2.0, help="Line tolerance (px) of the F-score.")
@click.option("--batch-size", type=click.IntRange(1), default=4)
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto")
@precision_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate(model_folder, pairs, out, refine, gender, sketch_method, tol, batch_size, device, precision, quiet):
    """Generate a face for every (sketch, photo) pair and report face detection rate, landmark
    error, sketch fidelity and the Frechet distance of face embeddings (see metrics.json for
    one sentence per metric). An unreadable sketch or photo, a name with two images on one
    side (a.png and a.jpg), or a name on one side only leaves its pair out with one line on
    stderr, and the exit status is then 1."""
    import math

    from dfd_data.sketch_methods import METHODS
    from .evaluate import evaluate as run

    for value, option in ((refine, "--refine"), (tol, "--tol")):
        if not math.isfinite(value):  # (click's ranges let NaN through, and --tol inf)
            raise click.BadParameter(f"{value}: expected a finite number", param_hint=option)
    if sketch_method not in METHODS:
        raise click.BadParameter(f"unknown sketch method {sketch_method!r} (known: {', '.join(METHODS)})",
                                 param_hint="--sketch-method")
    model = _load_model(model_folder, device, precision)
    _check_gender(model, gender)
    result = run(model, pairs, out, refine=refine, gender=gender, sketch_method=sketch_method, tol=tol,
                 batch_size=batch_size, quiet=quiet)
    for line in result.skipped:
        click.echo(line, err=True)
    click.echo(result.table())
    skipped = f", {len(result.skipped)} skipped (unreadable, ambiguous or unpaired)" if result.skipped else ""
    click.echo(f"evaluate: {result.counts['pairs']} pairs{skipped}; metrics {Path(out) / 'metrics.json'}; grid "
               f"{Path(out) / 'grid.jpg'}")
    if result.skipped:
        raise SystemExit(1)


@main.command(epilog="""\b
API (JSON; images as base64 PNG data URLs):
  GET  /api/info      -> {"resolution", "genders", "components", "has_banks"}
  POST /api/generate  {"sketch": "data:image/png;base64,...", "refine": 1 | {"nose": 0.5},
                       "gender": null | "female", "shadow": false}
                      -> {"face": "data:image/png;base64,...", "shadow": ... | null, "seconds": 0.4}
  Errors: {"error": "..."} with 400, 403 (a page of another site, or a Host header naming
  one), 404, 405, 411, 413 (body over 8 MiB), 415 (a POST not sent as application/json),
  503 (busy) or 500 (a bug).
\b
Example:
  dfd-model serve --model runs/run-001/model        # then open http://127.0.0.1:8000/""")
@click.option("--model", "model_folder", required=True, type=click.Path(file_okay=False, exists=True),
              help="A model folder (a training run's model/).")
@click.option("--host", default="127.0.0.1", help="Address to bind; 0.0.0.0 exposes the app to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, help="Port (0 picks a free one).")
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto")
@precision_option
def serve(model_folder, host, port, device, precision):
    """Start the drawing app: draw a sketch in the browser and watch the face follow every
    stroke, with shadow guidance, gender and per-component refinement."""
    from .serve import check_address, make_server

    check_address(host, port)  # a taken port or a bad --host: one line now, not after the model loads
    model = _load_model(model_folder, device, precision)
    server = make_server(model, host, port)
    bound_host, bound_port = server.server_address[:2]
    click.echo(f"serving {model_folder} ({model.config.resolution} px, device "
               f"{next(model.parameters()).device}) at http://{bound_host}:{bound_port}/ ; Ctrl+C stops",
               )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

"""`dfd-model`: train DeepFaceDrawing and generate faces from sketches."""
from __future__ import annotations

import click
import torch

from . import __version__
from dfd_data.devices import DEVICE_CHOICES, resolve_device
from dfd_data.errors import DeviceError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="dfd-model")
def main():
    """Train the two-stage DeepFaceDrawing model and turn sketches into faces."""


@main.command()
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", help="Device to report on.")
def env(device):
    """Print the torch build, the device that --device picks, and the CPU threads in use."""
    try:
        chosen = resolve_device(device)
    except DeviceError as error:
        raise click.ClickException(str(error)) from None
    detail = f" ({torch.cuda.get_device_name(chosen)})" if chosen.type == "cuda" else ""
    click.echo(f"torch {torch.__version__}; device {chosen}{detail}; {torch.get_num_threads()} CPU threads; "
               f"CUDA devices: {torch.cuda.device_count()}")

"""Sample face photos that ship inside installed packages, for a first run with no data."""
from __future__ import annotations

import os
from pathlib import Path

from .atomic import atomic_write_bytes
from .image_io import encode_png


def write_samples(folder: str | os.PathLike) -> list[Path]:
    """Copy matplotlib's grace_hopper.jpg and scikit-image's astronaut into `folder`."""
    import matplotlib.cbook
    import skimage.data

    folder = Path(folder)
    grace = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    written = [folder / "grace_hopper.jpg", folder / "astronaut.png"]
    atomic_write_bytes(written[0], grace.read_bytes())
    atomic_write_bytes(written[1], encode_png(skimage.data.astronaut()))
    return written

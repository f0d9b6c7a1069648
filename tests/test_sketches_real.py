"""Every sketch method on every CelebA-HQ photo in ../shared/data produces a sketch."""
from __future__ import annotations

import numpy as np
import pytest

from dfd_data.dataset import Dataset
from dfd_data.errors import ModelMissingError
from dfd_data.image_io import read_image
from dfd_data.sketch_methods import METHODS
from dfd_data.simplifier import DEFAULT_SIMPLIFIER
from dfd_data.weights import hed_weights_path
from tests.conftest import dfd_data


@pytest.fixture(scope="module")
def celebahq_faces(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("celebahq") / "faces"
    result = dfd_data("align", shared_data / "celebahq", root, "--size", "256", "--jobs", "2")
    assert result.returncode == 0, result.stderr
    return root


def _needs(method: str) -> str | None:
    if method.startswith("hed"):
        try:
            hed_weights_path()
        except ModelMissingError as error:
            return str(error)
    if "simplify" in method and not DEFAULT_SIMPLIFIER.is_file():
        return f"the shipped simplifier {DEFAULT_SIMPLIFIER} is missing"
    return None


@pytest.mark.parametrize("method", METHODS)
def test_method_sketches_every_celebahq_photo(celebahq_faces, method):
    missing = _needs(method)
    if missing:
        pytest.skip(missing)
    result = dfd_data("build-sketches", celebahq_faces, "--method", method, "--preview", "4", "--quiet")
    assert result.returncode == 0, result.stderr
    aligned = Dataset(celebahq_faces).aligned()
    assert len(aligned) == 56
    assert result.stdout.startswith(f"build-sketches:{method}: 56 done, 0 skipped, 0 failed")
    inks = []
    for record in aligned:
        sketch = read_image(celebahq_faces / f"sketches/{method}/{record['id']}.png")[:, :, 0]
        inks.append(float((sketch < 128).mean()))
    assert 0.002 < np.median(inks) < 0.35  # lines on paper, neither blank nor black

"""Shared fixtures: the real data in ../shared/data, sample face photos from installed
packages, and a small aligned dataset built once per test session."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dfd_data.samples import write_samples

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real face data not found at {SHARED_DATA} (only developer and CI machines have it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_photos(tmp_path_factory) -> Path:
    """grace_hopper.jpg and astronaut.png, copied from matplotlib and scikit-image."""
    folder = tmp_path_factory.mktemp("samples")
    write_samples(folder)
    return folder


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory, sample_photos) -> Path:
    """The two sample photos aligned at 128 px and cropped; copy it before changing it."""
    root = tmp_path_factory.mktemp("sample-dataset") / "faces"
    assert dfd_data("align", sample_photos, root, "--size", "128", "--jobs", "1").returncode == 0
    assert dfd_data("crop-components", root, "--jobs", "1").returncode == 0
    return root


@pytest.fixture
def dataset_copy(sample_dataset, tmp_path) -> Path:
    target = tmp_path / "faces"
    shutil.copytree(sample_dataset, target)
    return target


def dfd_data(*args, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run the real `dfd-data` command line in a subprocess, as a user would."""
    command = [sys.executable, "-m", "dfd_data", *map(str, args), "--quiet"] if args[0] in ("align", "crop-components") \
        else [sys.executable, "-m", "dfd_data", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, check=check, cwd=REPO, **kwargs)

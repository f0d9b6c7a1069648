"""Shared fixtures: the real data in ../shared/data, sample face photos from installed
packages, and a small aligned dataset built once per test session."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

# Under pytest-xdist (the README's `-n 2`) each test process, and every command it starts, runs
# OpenMP and BLAS on one thread unless the caller chose otherwise: two processes of two threads
# each on two cores spun against each other (the suite took 665 s so, 535 s on one thread each).
# Set before torch or numpy is imported here, as both read it when they load.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from dfd_data.samples import write_samples  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real face data not found at {SHARED_DATA} (only developer and CI machines have it)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks in this process run on one thread: on a shared CPU, OpenMP threads
    spinning against another busy process make them ~50x slower than a single thread."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder `name`, filled by `build(folder)` once per test run: under pytest-xdist the
    first process to ask builds it in the folder every process of the run shares, the others
    wait for it and read it (the tiny model alone had cost each process 30 to 80 s). Whoever
    uses it only reads it."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-N, above each process's popen-gwK (never shared by two runs)
    folder = shared / "built-once" / name
    folder.parent.mkdir(exist_ok=True)
    with open(folder.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder.parent / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # (what a process that failed to build it left)
            folder.mkdir()
            build(folder)
            (folder.parent / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def sample_photos(tmp_path_factory) -> Path:
    """grace_hopper.jpg and astronaut.png, copied from matplotlib and scikit-image."""
    return built_once(tmp_path_factory, "samples", write_samples)


def _build_sample_dataset(folder: Path, photos: Path) -> None:
    root = folder / "faces"
    assert dfd_data("align", photos, root, "--size", "128", "--jobs", "1").returncode == 0
    assert dfd_data("crop-components", root, "--jobs", "1").returncode == 0


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory, sample_photos) -> Path:
    """The two sample photos aligned at 128 px and cropped; copy it before changing it."""
    return built_once(tmp_path_factory, "sample-dataset", lambda folder: _build_sample_dataset(folder, sample_photos)) \
        / "faces"


def label_dataset(root: Path, rows: list[tuple[str, str, str]]) -> None:
    table = root.parent / "labels.csv"
    table.write_text("id,gender,split\n" + "".join(f"{i},{g},{s}\n" for i, g, s in rows))
    assert dfd_data("label", root, table).returncode == 0


@pytest.fixture(scope="session")
def sketched_dataset(tmp_path_factory, sample_photos) -> Path:
    """The two package sample photos aligned at 128 px with photocopy sketches, one labelled
    female and one male (a fresh clone has these without ../shared/data)."""
    return built_once(tmp_path_factory, "train-dataset",
                      lambda folder: _build_sketched_dataset(folder, sample_photos)) / "faces"


def _build_sketched_dataset(folder: Path, photos: Path) -> None:
    root = folder / "faces"
    assert dfd_data("align", photos, root, "--size", "128", "--jobs", "1").returncode == 0
    result = dfd_data("build-sketches", root, "--method", "photocopy", "--jobs", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    ids = sorted(json.loads(line)["id"] for line in (root / "records.jsonl").read_text().splitlines())
    label_dataset(root, [(ids[0], "female", "train"), (ids[1], "male", "train")])


# A model small enough to train in seconds on one core (a few hundred thousand parameters).
TINY_128 = dict(resolution=128, latent_dim=32, ce_base_channels=4, fm_base_channels=4, fm_channels=8, ngf=8,
                n_blocks=1, ndf=8, n_layers_d=2, num_d=2)
TINY_SETTINGS = [arg for key, value in TINY_128.items() if key != "resolution" for arg in ("--set", f"{key}={value}")]


def run_losses(run: Path) -> list[tuple[int, int, dict]]:
    """(stage, step, losses) of every row of a training run's stats.jsonl."""
    return [(row["stage"], row["step"], row["losses"])
            for row in map(json.loads, (run / "stats.jsonl").read_text().splitlines())]


@pytest.fixture(scope="session")
def tiny_model_folder(sketched_dataset, tmp_path_factory) -> Path:
    """A TINY_128 model trained 40 steps per stage on `sketched_dataset` (enough for its
    encoders' BatchNorm statistics to settle, so latents follow the sketch), with gender banks."""
    import torch

    from dfd_model.config import ModelConfig
    from dfd_model.training import TrainConfig, Trainer

    def train(folder: Path) -> None:
        config = TrainConfig(steps=40, batch_size=2, log_every=10, grid_every=100, checkpoint_every=100)
        Trainer(sketched_dataset, folder / "run", ModelConfig(**TINY_128), config, torch.device("cpu"), quiet=True,
                echo=lambda line: None).run("all")

    return built_once(tmp_path_factory, "tiny-run", train) / "run" / "model"


@pytest.fixture
def dataset_copy(sample_dataset, tmp_path) -> Path:
    target = tmp_path / "faces"
    shutil.copytree(sample_dataset, target)
    return target


def skip_without_extra(backend: str) -> None:
    """Skips a test of the dask or ray backend where its extra is not installed (the other
    backends need none)."""
    if backend in ("dask", "ray"):
        pytest.importorskip({"dask": "dask.distributed", "ray": "ray"}[backend],
                            reason=f"the [{backend}] extra is not installed")


def dfd_data(*args, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run the real `dfd-data` command line in a subprocess, as a user would."""
    command = [sys.executable, "-m", "dfd_data", *map(str, args), "--quiet"] if args[0] in ("align", "crop-components") \
        else [sys.executable, "-m", "dfd_data", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, check=check, cwd=REPO, **kwargs)


def pytest_sessionfinish(session):
    """In a pytest-xdist worker: hand this process's hostile-input counts to the controller,
    which prints the tally (the tests that count run in the workers)."""
    from dataclasses import asdict

    from tests.hostile import TALLY

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["hostile_tally"] = asdict(TALLY)


@pytest.hookimpl(optionalhook=True)  # (pytest-xdist's hook: absent where it is not loaded)
def pytest_testnodedown(node, error):
    """In the pytest-xdist controller: add a finished worker's hostile-input counts."""
    from tests.hostile import TALLY

    for field, count in getattr(node, "workeroutput", {}).get("hostile_tally", {}).items():
        setattr(TALLY, field, getattr(TALLY, field) + count)


def pytest_terminal_summary(terminalreporter):
    """The hostile-input tally of tests/hostile.py (every worker's, under pytest-xdist), when
    this session tried any."""
    from tests.hostile import TALLY

    if TALLY.tried:
        terminalreporter.write_sep("-", "hostile inputs")
        terminalreporter.write_line(TALLY.line())


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie has, awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            with open(entry / "stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):  # (it ended meanwhile)
            pass
    return found

"""The `dfd-model` entry point is installed and picks the CPU when there is no CUDA."""
from __future__ import annotations

import subprocess
import sys

import torch


def test_env_reports_the_device():
    result = subprocess.run([sys.executable, "-c", "from dfd_model.cli import main; main()", "env"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"device {expected}" in result.stdout and f"torch {torch.__version__}" in result.stdout


def test_generate_gives_every_input_its_own_output_name():
    """Equal stems in different folders get -2, -3 ... and never a name another input has
    (a.png, b/a.png and a-2.png once wrote two faces to a-2.png, one over the other)."""
    from pathlib import Path

    from dfd_model.generate import _output_names

    paths = [Path("a/x.png"), Path("b/x.png"), Path("c/x-2.png"), Path("d/x.jpg"), Path("y.png")]
    names = _output_names(paths)
    assert names == ["x", "x-3", "x-2", "x-4", "y"]
    assert len(set(_output_names(paths[::-1]))) == len(paths)

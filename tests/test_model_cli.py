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

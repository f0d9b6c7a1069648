"""Choosing the torch device (`auto` means CUDA when present, else the CPU) and the number of
CPU threads torch may use."""
from __future__ import annotations

import contextlib
import os

import torch

from .errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """A torch.device for `name` (a torch.device passes through unchanged)."""
    if isinstance(name, torch.device):
        return name
    if name not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {name!r}; choose from {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def cpu_threads(threads: int | None = None):
    """Let torch use `threads` (default: every usable CPU; torch's own default can be fewer
    under some launchers) for the duration, then restore the previous setting so callers
    running several workers are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or usable_cpus())
    try:
        yield
    finally:
        torch.set_num_threads(before)

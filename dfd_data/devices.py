"""Choosing the torch device: `auto` means CUDA when present, else the CPU."""
from __future__ import annotations

import torch

from .errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {name!r}; choose from {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)

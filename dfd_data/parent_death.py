"""Ending a worker process with its parent (Linux's prctl PR_SET_PDEATHSIG). Workers whose
parent was killed (kill -9, an out-of-memory kill) had gone on working, orphaned: loky's
workers wrote files the command never recorded, and torchrun's processes trained on into a
run folder that a resumed run then wrote too."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # (linux/prctl.h)


def end_with_parent(parent: int, number: int = signal.SIGTERM) -> None:
    """Have the kernel send signal `number` to this process when the thread that started it
    ends (in practice its parent, `parent`), and send it now where `parent` has already ended
    (no signal would come). Elsewhere than Linux nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, number)
    if os.getppid() != parent:
        signal.raise_signal(number)


__all__ = ["end_with_parent"]

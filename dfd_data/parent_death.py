"""Asking Linux to signal a worker process when its parent ends (prctl PR_SET_PDEATHSIG).
Workers whose parent was killed (kill -9, an out-of-memory kill) had gone on working,
orphaned: loky's workers wrote files the command never recorded, and torchrun's processes
trained on into a run folder that a resumed run then wrote too."""
from __future__ import annotations

import ctypes
import sys

_PR_SET_PDEATHSIG = 1  # (linux/prctl.h)


def signal_when_parent_ends(number: int) -> bool:
    """Have the kernel send signal `number` to this process when the thread that started it
    ends (in practice its parent process); True where it took the request. Elsewhere than
    Linux nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, number) == 0


__all__ = ["signal_when_parent_ends"]

"""One process at a time trains into a run folder. A second one (a resume started while the
first still ran, or torchrun processes that outlived their agent) wrote the same stats,
checkpoints and model: each removed the other's checkpoint in progress, the stats held rows
twice, and the weights were those of neither run."""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Callable, IO

from dfd_data.errors import UserError

try:
    import fcntl
except ImportError:  # (Windows: runs are not guarded there)
    fcntl = None

LOCK_FILE = ".training.lock"
# The locks this process holds: (device, inode) of a lock file -> [it open, trainers holding it].
# Trainers of one process share a folder's lock (a flock taken twice by one process refuses the
# second), so a script may make a new trainer to resume a run before the old one is collected.
_HELD: dict[tuple[int, int], list] = {}
# (re-entrant: a holder collected by the garbage collector inside a change releases in its thread)
_HELD_CHANGES = threading.RLock()


class RunFolderBusy(UserError):
    """Another process trains into the run folder."""


class RunFolderLock:
    """Held by a trainer that writes a run folder, until released (Trainer.close) or collected:
    an exclusive flock on LOCK_FILE (NFS clients take it from the server's lock manager), which
    ends with the process however it ends. The file names its holder."""

    def __init__(self, folder: Path, warn: Callable[[str], None]):
        self.key = None
        if fcntl is None:
            return
        handle = open(folder / LOCK_FILE, "a+")
        status = os.fstat(handle.fileno())
        key = (status.st_dev, status.st_ino)  # (the file itself: a folder made again under its old name is new)
        with _HELD_CHANGES:
            if key in _HELD:
                handle.close()
            elif _locked(folder, handle, warn):
                _HELD[key] = [handle, 0]
            else:
                return
            _HELD[key][1] += 1
        self.key = key

    def release(self) -> None:
        with _HELD_CHANGES:
            if self.key is None:
                return
            entry = _HELD[self.key]
            entry[1] -= 1
            if entry[1] == 0:
                entry[0].close()
                del _HELD[self.key]
            self.key = None

    def __del__(self) -> None:
        if self.key is not None:
            self.release()


def _locked(folder: Path, handle: IO[str], warn: Callable[[str], None]) -> bool:
    """Whether this process now holds the lock file open in `handle` (closed where not):
    False (said) where the file system has no locks; RunFolderBusy where another process holds
    it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read(200).strip() or "a process that has not said which"
        handle.close()
        raise RunFolderBusy(f"{folder}: another process is training into this run folder ({holder}); let it "
                            "finish or stop it, then run this again") from None
    except OSError as error:  # (a file system without locks): train, unguarded
        handle.close()
        warn(f"warning: {folder}: cannot lock the run folder ({error.strerror}): nothing stops another process "
             "from training into it at the same time")
        return False
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return True


__all__ = ["LOCK_FILE", "RunFolderBusy", "RunFolderLock"]

"""Multi-process training under torchrun: process group, device per rank, gradient sync.

`dfd-model train` runs unchanged as `torchrun --nproc-per-node N -m dfd_model train ...`:
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) starts a process group (nccl on CUDA,
gloo on CPU), each process takes its share of every global batch, DistributedDataParallel
averages the gradients, and rank 0 alone prints, writes grids, stats and checkpoints. Without
torchrun everything here is a no-op for a single process.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import distributed as dist
from torch import nn

from dfd_data.atomic import atomic_write_text
from dfd_data.errors import DeviceError, UserError
from dfd_data.parent_death import end_with_parent

T = TypeVar("T")
# How long a training collective waits for the slowest process before the run stops with an
# error: a stalled process (a hung file system, a deadlock) held the others for this long.
# Rank 0's checkpoints and grids, which the others wait for at their next step, take minutes.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# How long the processes wait for one another across long stretches without a collective, in a
# process group of their own (Ranks.long_waits): rank 0 stacks the training pairs of a fresh run
# in main_first, 27 ms a pair at 512 px on a 2-core CPU, 13 minutes for 30K faces; every
# process encodes the banks, hours for 30K faces on a CPU, and processes a few percent apart
# in speed finish them many minutes apart.
LONG_WAIT_TIMEOUT = timedelta(hours=4)


# This process's parent as this module was imported (the command line imports it first):
# torchrun's agent, under torchrun.
_PARENT_AT_IMPORT = os.getppid()


class OtherRankFailed(UserError):
    """Raised on the processes other than rank 0 when rank 0's share of the work failed: they
    stop with it rather than wait for it in the next collective."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    long_waits: object = None  # the process group of waits of up to LONG_WAIT_TIMEOUT

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched_world() -> int:
    """The number of processes torchrun started (1 without torchrun), before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as torchrun started it (0 without torchrun), before any process group."""
    return int(os.environ.get("RANK", "0")) if launched_world() > 1 else 0


def launched_local_rank() -> int:
    """This process's rank on its machine as torchrun started it (0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched_world() > 1 else 0


def start(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group if there is one; returns the ranks and this process's device."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun's agent, which starts each in a session of its own
        # the agent killed (kill -9, out of memory), its processes had trained on, orphaned, into a
        # run folder that a resumed run then wrote too; SIGTERM is what the agent sends them itself
        end_with_parent(_PARENT_AT_IMPORT)
    world = launched_world()
    if world <= 1:
        return Ranks(), device
    if device.type == "cuda":
        _check_one_gpu_each()
        device = torch.device("cuda", launched_local_rank())
        torch.cuda.set_device(device)
    try:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
        # (the run's own backend: a gloo group beside nccl needs every machine's hostname to resolve
        # to an address the others reach, and fails at the start where it is a loopback one)
        long_waits = dist.new_group(timeout=LONG_WAIT_TIMEOUT)
    except dist.DistError as error:  # (a port in use, a store or peer that cannot be reached): one line
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise UserError(f"cannot start the process group with the run's other processes (store at {where}): "
                        f"{' '.join(str(error).split())}") from None
    return Ranks(launched_rank(), world, launched_local_rank(), long_waits), device


def _check_one_gpu_each() -> None:
    """A DeviceError (said by the machine's first process, see cli.train) where this machine has
    fewer GPUs than torchrun started processes on it: CUDA's "invalid device ordinal" had been
    a traceback from the processes left without one."""
    count = torch.cuda.device_count()
    here = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), launched_local_rank() + 1)
    if here > count:
        raise DeviceError(f"torchrun started {here} processes on this machine, which has {count} CUDA device(s): "
                          f"one process per GPU (--nproc-per-node {count} or fewer)")


def stop(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()


def wait_for_all(ranks: Ranks) -> None:
    """A barrier of up to LONG_WAIT_TIMEOUT, after work that processes finish far apart."""
    if ranks.active:
        dist.barrier(group=ranks.long_waits)


def main_first(ranks: Ranks, work: Callable[[], T]) -> T | None:
    """`work()` on rank 0 while the others wait; its result on rank 0, None elsewhere. If it
    raises, every process raises (OtherRankFailed on the others, with rank 0's message): the
    others would otherwise find rank 0 gone at their next collective and fail with a
    connection error's traceback."""
    if not ranks.active:
        return work()
    result, failure = None, None
    if ranks.main:
        try:
            result = work()
        except Exception as error:  # every failure, or the others would wait for rank 0 forever
            failure = error
    message = [None if failure is None else str(failure) or type(failure).__name__]
    dist.broadcast_object_list(message, src=0, group=ranks.long_waits)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise OtherRankFailed(f"rank 0 stopped: {message[0]}")
    return result


def on_every_rank(ranks: Ranks, work: Callable[[], T]) -> T:
    """`work()` on every process, which then learn whether any failed. If one did, rank 0
    alone reports it (its own error first, else the first rank's that failed) and the others
    stop with OtherRankFailed: an error that every process meets (a damaged checkpoint) is one
    line, not one per process. A bug's error (not a UserError) keeps its traceback anywhere."""
    if not ranks.active:
        return work()
    result, failure = None, None
    try:
        result = work()
    except Exception as error:  # every failure, or the others would wait for this process forever
        failure = error
    messages: list = [None] * ranks.world
    dist.all_gather_object(messages, None if failure is None else str(failure) or type(failure).__name__,
                           group=ranks.long_waits)
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if not failed:
        return result
    if failure is not None and (ranks.main or not isinstance(failure, UserError)):
        raise failure
    if ranks.main:
        raise UserError(f"rank {failed[0][0]}: {failed[0][1]}")
    raise OtherRankFailed(f"rank {failed[0][0]} stopped: {failed[0][1]}")


def check_shared_folder(ranks: Ranks, folder: Path) -> None:
    """Stops every process, rank 0 with one line, unless each one sees `folder` (which rank 0
    has created) as rank 0 does. Rank 0 alone writes the run folder and the others read it: on
    machines without storage they share, a process that did not find the run's configuration
    failed alone, and rank 0 said only that another process had ended; one that found an old
    run there would have trained from another configuration. Rank 0 writes a mark of a name
    never used before and removes it once every process has looked."""
    if not ranks.active:
        return
    token = main_first(ranks, lambda: _marked(folder))
    shared = [token]
    dist.broadcast_object_list(shared, src=0)
    mark = folder / f"{_MARK_PREFIX}{shared[0]}"
    try:
        sights: list = [None] * ranks.world
        dist.all_gather_object(sights, (_unseen_because(mark, shared[0]), socket.gethostname()))
    finally:
        if ranks.main:
            with contextlib.suppress(OSError):  # (litter at worst: every process has looked)
                mark.unlink(missing_ok=True)
    blind = [(rank, host, reason) for rank, (reason, host) in enumerate(sights) if reason is not None]
    if blind:
        rank, host, reason = blind[0]
        message = (f"{folder}: rank {rank} (on {host}) does not see this run folder as rank 0 (on {sights[0][1]}) "
                   f"does ({reason}): torchrun on several machines needs --out on storage that every machine shares")
        raise UserError(message) if ranks.main else OtherRankFailed(message)


_MARK_PREFIX = ".seen-by-every-rank-"
# How long a process looks for rank 0's mark before it counts as unseen. An NFS client may
# remember for up to a minute that the run folder was missing (every process looks at --out as
# its options are read, before rank 0 creates it); listing the folders above makes it look again.
MARK_SEARCH_SECONDS = 5.0


def _marked(folder: Path) -> str:
    for left in folder.glob(f"{_MARK_PREFIX}*"):  # (a run ended by a signal mid-check leaves its mark)
        left.unlink(missing_ok=True)
    token = secrets.token_hex(16)
    atomic_write_text(folder / f"{_MARK_PREFIX}{token}", token)
    return token


def _unseen_because(mark: Path, token: str) -> str | None:
    """None where `mark` holds `token`, else why not (the last error met in MARK_SEARCH_SECONDS)."""
    deadline = time.monotonic() + MARK_SEARCH_SECONDS
    while True:
        try:
            if mark.read_text() == token:
                return None
            reason = "the mark it reads differs"
        except OSError as error:
            reason = error.strerror or type(error).__name__
        if time.monotonic() >= deadline:
            return reason
        for folder in (mark.parent.parent, mark.parent):
            with contextlib.suppress(OSError):
                os.listdir(folder)
        time.sleep(0.25)


# What a collective's error says where the process at the other end has gone (it ended with an
# error of its own, which it prints): gloo's closed or reset connections, NCCL's remote error.
# c10d raises the same error types for faults of this process's own (a port in use, a store).
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


def lost_peer(error: BaseException) -> bool:
    """Whether `error`, raised in a collective, says that another process of the run has gone."""
    return isinstance(error, RuntimeError) and any(text in str(error) for text in LOST_PEER)


def timed_out(error: BaseException) -> float | None:
    """The minutes a collective waited for another process before `error` (gloo's words: "Timed
    out waiting 1800000ms ..."; nccl's watchdog ends the process itself), else None."""
    found = re.search(r"Timed out waiting (\d+)ms", str(error)) if isinstance(error, RuntimeError) else None
    return int(found.group(1)) / 60_000 if found else None


def broadcast_buffers(module: nn.Module, ranks: Ranks) -> None:
    """Give every process rank 0's buffers (batch norms' running statistics). DDP copies them
    at the start of each forward pass, but the pass then updates each process's copy from its
    own share of the batch: after the last step of a stage they differ."""
    if ranks.active:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def wrap(module: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `module` when several processes train, else `module`."""
    if not ranks.active:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def mean_over_ranks(values: dict[str, float], ranks: Ranks, device: torch.device) -> dict[str, float]:
    """Average logged losses over the processes, so rank 0 reports the global batch."""
    if not ranks.active:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / ranks.world).tolist()))


def replicas_agree(modules: list[nn.Module], ranks: Ranks, device: torch.device) -> bool:
    """True when every process holds the same parameters and buffers (checked at each checkpoint)."""
    if not ranks.active:
        return True
    digest = torch.stack([t.detach().double().sum() + (t.detach().double() ** 2).sum()
                          for module in modules for t in (*module.parameters(), *module.buffers())]).to(device)
    gathered = [torch.empty_like(digest) for _ in range(ranks.world)]
    dist.all_gather(gathered, digest)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


__all__ = ["COLLECTIVE_TIMEOUT", "LONG_WAIT_TIMEOUT", "OtherRankFailed", "Ranks", "barrier", "broadcast_buffers",
           "check_shared_folder", "launched_rank", "lost_peer", "main_first", "mean_over_ranks", "on_every_rank",
           "replicas_agree", "start", "stop", "timed_out", "unwrap", "wait_for_all", "wrap"]

"""Checking every machine of a cluster before a step gives out any file.

A command checks on its own machine what its step needs (the folders it reads and writes, the
landmark model, a sketch method's weights and device) and stops with one line where that
fails. On a cluster the workers run elsewhere: a worker whose machine lacked the weights or
the dataset's storage failed every file it took, and took them faster than the healthy
workers. `check_workers` asks every worker process (dask) or node (ray) the same before the
step starts, and stops the command with one line naming the machines that fail.
"""
from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading
import time
from typing import Callable

from .cluster import CLUSTER_BACKENDS, connected, started_here
from .errors import UserError

# How long the check waits for every worker's answer: each loads the step's networks, seconds
# on a machine that has them. A worker that has not answered (stopped, swapping) by then is
# not waited for: if it lacks anything, the files it takes say so.
CHECK_SECONDS = 120
# Machines named for one cause, at most; the others are counted.
NAMED_MACHINES = 3


def _why(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    # (dask hands an error it could not rebuild here back as a bare Exception that names it)
    return message if isinstance(error, UserError) or type(error) is Exception else f"{type(error).__name__}: {message}"


def _probe(check: Callable[[], object] | None, reads: tuple[str, ...], writes: tuple[str, ...]
           ) -> tuple[str, str | None]:
    """Runs on a worker: (its machine's name, None if it sees the folders `reads`, can write a
    file in each of `writes` and passes `check` there; else why not)."""
    host = socket.gethostname()
    for folder in (*reads, *writes):
        if not os.path.isdir(folder):
            return host, (f"cannot see {folder} (photos and datasets must be on storage every worker sees, "
                          "at the same path)")
    for folder in writes:
        try:  # (a file, not os.access: network file systems map users in ways access() does not see)
            handle, path = tempfile.mkstemp(dir=folder, prefix=".dfd-write-check-")
            os.close(handle)
        except OSError as error:
            return host, f"cannot write in {folder} ({error.strerror or error})"
        try:
            os.unlink(path)
        except OSError as error:  # the step replaces files as it writes them: it could not
            return host, f"can create files in {folder} but not remove them ({error.strerror or error}); remove {path}"
    try:
        if check is not None:
            check()
    except Exception as error:  # every cause is the user's to see: a missing package, weights, device
        return host, _why(error)
    return host, None


async def _probe_off_the_loop(*probe_args) -> tuple[str, str | None]:
    """`_probe` for dask's Client.run, which runs a plain function in the worker's event loop:
    loading networks there for seconds stopped its heartbeats and task results. It runs in a
    daemon thread of its own: the loop's executor is dask's too, and a worker waits for that
    executor's threads as it shuts down (one check stuck on a hung mount held it 43 s)."""
    loop = asyncio.get_running_loop()
    answer = loop.create_future()

    def run() -> None:
        try:
            result = _probe(*probe_args)
        except BaseException as error:  # (_probe answers every Exception itself: this is an interrupt)
            loop.call_soon_threadsafe(answer.set_exception, error)
            return
        loop.call_soon_threadsafe(answer.set_result, result)

    threading.Thread(target=run, name="dfd-worker-check", daemon=True).start()
    return await answer


def _answers(asks: dict[str, Callable[[], tuple[str, str | None]]], still_there: Callable[[str], bool],
             place: Callable[[str], str]) -> tuple[int, list[tuple[str, str | None]]]:
    """(how many were asked, the answers of `asks` that came within CHECK_SECONDS), each asked
    in a daemon thread. An error raised by the worker itself (it could not even import the
    toolkit, say) is its answer where it is still there, on the machine `place(key)` names; a
    lost connection means it has left (or is leaving: an adaptive cluster retiring it), and
    takes no files either."""
    answers: dict[str, tuple[str, str | None]] = {}

    def ask(key: str) -> None:
        try:
            answers[key] = asks[key]()
        except (OSError, TimeoutError):  # (dask's CommClosedError is an OSError)
            pass
        except Exception as error:
            try:
                if still_there(key):
                    answers[key] = (place(key), f"the check could not run there ({_why(error)})")
            except Exception:  # (the cluster itself went away: the run will say so)
                pass

    threads = [threading.Thread(target=ask, args=(key,), name="worker-check", daemon=True) for key in asks]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + CHECK_SECONDS
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return len(asks), list(answers.copy().values())


def _dask_answers(*probe_args) -> tuple[int, list[tuple[str, str | None]]]:
    """`_probe(*probe_args)` in every worker process of the session's dask cluster, beside its
    tasks (a busy worker answers at once); what the check loads stays loaded for its tasks."""
    from dask.distributed import default_client

    client = default_client()

    def ask(address: str) -> tuple[str, str | None]:
        return client.run(_probe_off_the_loop, *probe_args, workers=[address])[address]

    def host(address: str) -> str:
        """The worker's own name for its machine (the scheduler knows its address), else that address."""
        try:
            return client.run(socket.gethostname, workers=[address])[address]
        except Exception:  # (so that a worker that cannot even say its name is still reported)
            return address

    return _answers({address: (lambda address=address: ask(address)) for address in client.nthreads()},
                    lambda address: address in client.nthreads(), host)


def _ray_answers(*probe_args) -> tuple[int, list[tuple[str, str | None]]]:
    """`_probe(*probe_args)` on every node of the session's ray cluster, in a process of its own
    that ends after it (the work runs in the pool's actors, which load their own). It takes no
    CPU: busy nodes answer at once, and the pool's actors take none either, so nodes without
    CPUs get files too."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_calls=1)(_probe)
    hosts = {node["NodeID"]: node["NodeManagerHostname"] for node in ray.nodes() if node["Alive"]}

    def ask(node: str) -> tuple[str, str | None]:
        pinned = remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        return ray.get(pinned.remote(*probe_args))

    def alive(node: str) -> bool:
        return any(entry["NodeID"] == node and entry["Alive"] for entry in ray.nodes())

    return _answers({node: (lambda node=node: ask(node)) for node in hosts}, alive, hosts.__getitem__)


def _machines(hosts: list[str]) -> str:
    named = ", ".join(hosts[:NAMED_MACHINES])
    return f"machine {named}" if len(hosts) == 1 else \
        f"machines {named}" + (f" and {len(hosts) - NAMED_MACHINES} more" if len(hosts) > NAMED_MACHINES else "")


def check_workers(backend: str, step: str, check: Callable[[], object] | None = None, *,
                  reads: tuple = (), writes: tuple = ()) -> None:
    """Check every machine of the `backend` cluster this process is connected to as the caller
    checked this one: that it sees the folders `reads`, can write in `writes` and passes the
    step's setup `check` (loading its models); stop with one line naming the machines where
    that fails. A no-op for the local backends and for a cluster the command starts here (or
    will: it has none yet)."""
    if backend not in CLUSTER_BACKENDS or started_here(backend) or not connected(backend):
        return
    probe_args = (check, tuple(map(str, reads)), tuple(map(str, writes)))
    asked, answers = _dask_answers(*probe_args) if backend == "dask" else _ray_answers(*probe_args)
    failed = [(host, message) for host, message in answers if message is not None]
    if not failed:
        return
    hosts_by_cause: dict[str, list[str]] = {}
    for host, message in sorted(failed):
        hosts = hosts_by_cause.setdefault(message, [])
        if host not in hosts:
            hosts.append(host)
    unit = "worker" if backend == "dask" else "node"
    answered = f", {len(answers)} of which answered," if len(answers) < asked else ""
    causes = "; ".join(f"{_machines(hosts)}: {message}" for message, hosts in hosts_by_cause.items())
    raise UserError(f"{step}: {len(failed)} of the {backend} cluster's {asked} {unit}{'s' if asked > 1 else ''}"
                    f"{answered} cannot run this step, so no file was given out: {causes}")


__all__ = ["CHECK_SECONDS", "check_workers"]

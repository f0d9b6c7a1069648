"""Cluster backends for the batch runner: dask (through its own futures, see
runner._dask_outcomes) and ray (through joblib's backend mechanism).

Users who already run a dask scheduler or a ray cluster can spread `align`,
`build-sketches` and `crop-components` over it; without an address, a local cluster with
`jobs` single-threaded worker processes is started for the command and stopped after it.
Workers receive file paths, so on a real cluster the dataset must be on storage every
worker sees. Before any file is given out, `check_workers` runs the step's setup check on
every machine of a cluster the command connected to. Both libraries are optional extras:
asking for one that is not installed is a one-line error that names the extra.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import UserError

CLUSTER_BACKENDS = ("dask", "ray")
# How long connecting to a cluster may take before the command gives up with one line:
# dask's own timeout does not cover a server that accepts the connection and never answers
# (the dashboard's port given for the scheduler's), nor ray's a GCS address nothing listens at.
CONNECT_SECONDS = 20


def _missing_extra(backend: str, error: ImportError) -> UserError:
    return UserError(f"--backend {backend} needs the {backend} extra ({error.name} is not installed): "
                     f"pip install 'deepfacedrawing-toolkit[{backend}]'")


@contextmanager
def _dask_session(jobs: int, scheduler: str | None) -> Iterator[None]:
    try:
        from dask.distributed import Client, LocalCluster, default_client
    except ImportError as error:
        raise _missing_extra("dask", error) from None
    try:
        default_client()  # a client this process already has (the command's own, or the caller's)
        connected = True
    except ValueError:
        connected = False
    if connected:
        yield
        return
    if scheduler:
        with _connect_dask(Client, scheduler):
            yield
        return
    # The nanny gives each worker OMP_NUM_THREADS=1, so torch in `jobs` workers does not
    # oversubscribe the cores. The dashboard takes any free port (its default one, taken by
    # another cluster, was a warning on every run), and the workers' own logs stay quiet: a
    # task's error comes back to this process, and Ctrl-C made each worker print tracebacks.
    with _ctrl_c_ignored():  # by the workers it starts: this process stops them (one line, not 50)
        cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=logging.CRITICAL)
    with cluster, Client(cluster):
        yield


@contextmanager
def _ctrl_c_ignored() -> Iterator[None]:
    """SIGINT ignored for the block, in the main thread: processes started meanwhile inherit
    that, and Python leaves a signal ignored at its start ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _connect_dask(client_type, scheduler: str) -> Iterator[None]:
    """A client of the scheduler at `scheduler` for the block, or a one-line UserError within
    CONNECT_SECONDS (connecting runs in a thread that is left behind if it never returns)."""
    client, error = _in_time(lambda: client_type(scheduler, timeout=f"{CONNECT_SECONDS // 2}s"), "dask-connect")
    if client is None:
        if isinstance(error, MemoryError):  # (a reply that is no dask message, read as an absurd length)
            reason = "what answered there is not a dask scheduler"
        else:
            reason = " ".join(str(error).split()) if error else f"no dask scheduler answered in {CONNECT_SECONDS} s"
        raise UserError(f"--scheduler {scheduler}: cannot reach the dask scheduler ({reason})")
    with client:
        yield


def _in_time(connect: Callable[[], object], name: str) -> tuple[object | None, Exception | None]:
    """`connect()` run in a daemon thread for at most CONNECT_SECONDS (a client that retries
    for ever is left behind there): (its result, None), (None, its error), or (None, None)
    when it has not returned in time."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = connect()
        except Exception as error:  # reported by the caller, in the command's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(CONNECT_SECONDS)
    return outcome.get("result"), outcome.get("error")


def _check_ray_address(address: str) -> None:
    """A one-line UserError when RAY_ADDRESS is host:port and nothing accepts a connection
    there: ray.init would retry for ever."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^/:\s]+):(\d+)", address)
    if match is None:
        return  # "auto", "local", ray:// and http:// addresses: ray reports those itself
    try:
        with socket.create_connection((match[1].strip("[]"), int(match[2])), timeout=CONNECT_SECONDS / 2):
            pass
    except (OSError, ValueError) as error:  # (a malformed host name is a UnicodeError)
        raise UserError(f"ray: cannot reach the cluster at RAY_ADDRESS={address} ({error})") from None


class _RayNotices(logging.Filter):
    """Drops two notices ray prints on every run, about what the command chose for the user:
    that the local instance it starts uses token authentication (ray's secure default; its
    warning that authentication is off still shows), and that ray's pool ignores the start
    method joblib passes it."""

    LOGGERS = ("ray._private.authentication.authentication_token_setup", "ray.util.multiprocessing.pool")
    NOTICES = ("Token authentication is enabled for this Ray cluster", "The 'context' argument is not supported")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.NOTICES))


@contextmanager
def _ray_notices_dropped() -> Iterator[None]:
    notices = _RayNotices()
    for name in _RayNotices.LOGGERS:
        logging.getLogger(name).addFilter(notices)
    try:
        yield
    finally:
        for name in _RayNotices.LOGGERS:
            logging.getLogger(name).removeFilter(notices)


@contextmanager
def _ray_session(jobs: int) -> Iterator[None]:
    try:
        import ray
        from ray.util.joblib import register_ray
    except ImportError as error:
        raise _missing_extra("ray", error) from None
    register_ray()
    with _ray_notices_dropped():
        if ray.is_initialized():  # the command's own session, or the caller's: theirs to end
            yield
        else:
            with _ray_connection(ray, jobs):
                yield


@contextmanager
def _ray_connection(ray, jobs: int) -> Iterator[None]:
    """A ray session at RAY_ADDRESS, or a local instance of `jobs` CPUs, for the block."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_ray_address(address)
    # ("local": a new local instance, even where an earlier `ray start` left its address behind)
    options = {"address": address} if address else {"address": "local", "num_cpus": jobs, "include_dashboard": False}

    def start() -> bool:
        ray.init(logging_level=logging.WARNING, **options)
        return True

    if address:  # in time: ray retries for ever where something answers but is no ray head
        started, error = _in_time(start, "ray-init")
    else:  # (off the main thread ray sets no SIGTERM handler, and says so: local runs start here)
        try:
            started, error = start(), None
        except Exception as caught:  # (sorted below, as the thread's)
            started, error = None, caught
    if not started:
        if error is not None and not isinstance(error, (ConnectionError, RuntimeError, ValueError)):
            raise error  # a bug, not a cluster that cannot be reached: keep its traceback
        reason = " ".join(str(error).split()) if error else f"no ray head answered in {CONNECT_SECONDS} s"
        raise UserError(f"ray: cannot start or reach the cluster{f' at {address}' if address else ''} ({reason})")
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def cluster_session(backend: str, jobs: int, scheduler: str | None = None) -> Iterator[None]:
    """Connect to (or start) the cluster of `backend` for the duration of the block; a no-op
    for the local joblib backends and when this process is already connected."""
    if scheduler and backend != "dask":
        raise UserError(f"--scheduler is a dask address; --backend {backend} does not use it"
                        + (" (ray reads RAY_ADDRESS)" if backend == "ray" else ""))
    if backend not in CLUSTER_BACKENDS:
        yield
        return
    with _dask_session(jobs, scheduler) if backend == "dask" else _ray_session(jobs):
        yield


def _probe(check: Callable[[], object]) -> tuple[str, str | None]:
    """Runs on a worker: (its machine, None if `check` passed there, else why not)."""
    try:
        check()
        return f"machine {socket.gethostname()}", None
    except Exception as error:  # every cause is the user's to see: a missing package, weights, device
        return f"machine {socket.gethostname()}", _one_line(error)


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    return message if isinstance(error, UserError) else f"{type(error).__name__}: {message}"


def _dask_probes(check: Callable[[], object]) -> list[tuple[str, str | None]]:
    """`_probe(check)` once on every worker of the session's dask cluster, unless the command
    started that cluster here (its workers share this machine and environment)."""
    from dask.distributed import LocalCluster, get_client

    client = get_client()
    if isinstance(getattr(client, "cluster", None), LocalCluster):
        return []
    # in each worker's own process, where the step's loaders keep what the check loaded; before
    # any file (the highest priority), and never on another worker
    futures = {address: client.submit(_probe, check, workers=[address], allow_other_workers=False, pure=False,
                                      priority=1_000_000) for address in client.nthreads()}
    results = []
    for address, future in futures.items():
        try:
            results.append(future.result())
        except Exception as error:  # the worker died or left while checking
            results.append((f"worker {address}", f"the check could not run there ({_one_line(error)})"))
    return results


def _ray_probes(check: Callable[[], object]) -> list[tuple[str, str | None]]:
    """`_probe(check)` once on every node of the session's ray cluster but this process's own
    (where the command's check ran; a local instance has no other)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    nodes = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()
             if node["Alive"] and node["Resources"].get("CPU", 0) > 0 and node["NodeID"] != here}
    remote = ray.remote(num_cpus=1)(_probe)
    refs = {address: remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(check)
            for node, address in nodes.items()}
    results = []
    for address, ref in refs.items():
        try:
            results.append(ray.get(ref))
        except Exception as error:  # the node died or left while checking
            results.append((f"node {address}", f"the check could not run there ({_one_line(error)})"))
    return results


def check_workers(backend: str, step: str, check: Callable[[], object]) -> None:
    """Run the step's setup `check` (loading its models) on every machine of the cluster before
    any file is given out, and stop the command with one line naming each machine where it
    fails. The command's own check ran on this machine only: a worker whose machine lacks the
    weights failed every file it took, and took them faster than the healthy workers. A no-op
    for the local backends."""
    if backend not in CLUSTER_BACKENDS:
        return
    results = _dask_probes(check) if backend == "dask" else _ray_probes(check)
    lacking: dict[tuple[str, str], int] = {}
    for where, message in results:
        if message is not None:
            lacking[where, message] = lacking.get((where, message), 0) + 1
    if lacking:
        unit = "worker" if backend == "dask" else "node"
        causes = "; ".join(f"{where} ({count} {unit}{'s' if count > 1 else ''}): {message}"
                           for (where, message), count in sorted(lacking.items()))
        places = len({where for where, _ in lacking})
        raise UserError(f"{step}: {places} machine{'s' if places > 1 else ''} of the {backend} cluster cannot "
                        f"run this step, so no file was given out: {causes}")

"""Cluster backends for the batch runner: dask and ray, each through its own futures (see
runner._dask_outcomes and runner._ray_outcomes).

Users who already run a dask scheduler or a ray cluster can spread `align`,
`build-sketches` and `crop-components` over it; without an address, a local cluster with
`jobs` single-threaded worker processes is started for the command and stopped after it.
Workers receive file paths, so on a real cluster the dataset must be on storage every
worker sees (worker_check.py checks that, and the step's weights, on every machine of a
cluster the command connected to, before any file is given out). Both libraries are optional
extras: asking for one that is not installed is a one-line error that names the extra.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
import time
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from multiprocessing import resource_tracker
from typing import Callable, Iterator

from .errors import UserError

CLUSTER_BACKENDS = ("dask", "ray")
# How long connecting to a ray cluster may take before the command gives up with one line:
# ray.init retries a GCS address nothing listens at for ever. (A dask scheduler gets dask's own
# connect timeout: see _dask_connect_seconds.)
CONNECT_SECONDS = 20
CONNECT_MARGIN_SECONDS = 5  # beyond dask's connect timeout, for a server that accepted and never answers
# How long a dask run may find no worker in the cluster, or a ray run no CPU, before it says so:
# a cluster whose workers have not started (or have all left) holds the tasks, and the run
# waited without a word.
NO_WORKER_NOTICE_SECONDS = 15
_WATCH_SECONDS = 1.0  # between two looks at the cluster's workers
# How long a ray run may find its head (the GCS) refusing connections before it stops with one
# line: ray itself waited 60 s without a word, Ctrl-C ignored, then ended the process from C++.
HEAD_SILENCE_SECONDS = 10
# The backends whose cluster in use this command started on this machine (see started_here).
_STARTED_HERE: ContextVar[frozenset] = ContextVar("dfd_clusters_started_here", default=frozenset())


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
    # SIGINT is blocked while the cluster starts: the workers inherit the block, also those
    # started later after a crash (from the event loop's thread, started here), so that this
    # process alone stops them (one line, not 50), and a Ctrl-C meanwhile waits until the
    # cluster is up, then stops the command (ignored instead, it had been lost).
    # (multiprocessing's resource tracker unblocks SIGINT in the thread that starts it, the
    # cluster's event loop's, which starts the workers: so it is started first, from here)
    resource_tracker.ensure_running()
    with ExitStack() as stack:
        with _signal_deferred(signal.SIGINT):
            cluster = stack.enter_context(LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True,
                                                       dashboard_address=":0", silence_logs=logging.CRITICAL))
        stack.enter_context(Client(cluster))
        stack.enter_context(_started_here("dask"))
        yield


@contextmanager
def dask_worker_watch(client, say: Callable[[str], None]) -> Iterator[None]:
    """For the block: `say` once when the cluster has had no worker for NO_WORKER_NOTICE_SECONDS,
    and once more when one joins after that. The run goes on waiting: an adaptive cluster
    starts its workers for the tasks it holds."""
    stop = threading.Event()

    def watch() -> None:
        empty_since, said = None, False
        while not stop.wait(_WATCH_SECONDS):
            try:
                workers = len(client.nthreads())
            except Exception:  # (the client is closing: the run is over, or the cluster gone)
                return
            if workers:
                if said:
                    say(f"dask: {workers} worker{'s' if workers > 1 else ''} joined; the run goes on")
                empty_since, said = None, False
            elif not said:
                empty_since = empty_since or time.monotonic()
                if time.monotonic() - empty_since >= NO_WORKER_NOTICE_SECONDS:
                    address = client.scheduler.address
                    say(f"dask: the scheduler at {address} has had no worker for {NO_WORKER_NOTICE_SECONDS} s; "
                        f"the run waits for one (start one with: dask worker {address}), or press Ctrl-C")
                    said = True

    thread = threading.Thread(target=watch, name="dask-worker-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


class RayHeadWatch:
    """Tells the run when the head of the session's ray cluster is gone: its GCS port has
    refused connections (or let them time out) for HEAD_SILENCE_SECONDS. A run that had lost it
    waited 60 s without a word and ignoring Ctrl-C, until ray ended the process from C++. The
    watch counts only where it reached the head as the run began: the address ray reports is
    the head's own view, which a client elsewhere (ray://, a forwarded port) may not reach."""

    def __init__(self, gcs_address: str):
        self.gcs_address = gcs_address
        where = _host_and_port(gcs_address)
        self.where = where if where is not None and self._reached(where) else None
        self.silent_since: float | None = None
        self.looked = time.monotonic()

    @staticmethod
    def _reached(where: tuple[str, int]) -> bool:
        try:
            with socket.create_connection(where, timeout=_WATCH_SECONDS):
                return True
        except OSError:
            return False

    def answers(self) -> bool:
        """Whether the head accepts a connection now (True where the watch does not count)."""
        self.looked = time.monotonic()
        return self.where is None or self._reached(self.where)

    def check(self) -> None:
        """A one-line UserError once the head has been silent for HEAD_SILENCE_SECONDS; at most
        one look a _WATCH_SECONDS."""
        if time.monotonic() - self.looked < _WATCH_SECONDS:
            return
        if self.answers():
            self.silent_since = None
            return
        self.silent_since = self.silent_since or time.monotonic()
        if time.monotonic() - self.silent_since >= HEAD_SILENCE_SECONDS:
            raise self.lost(f"has not answered for {HEAD_SILENCE_SECONDS} s")

    def lost(self, how: str) -> UserError:
        """The run's one line for a head that `how` (e.g. "has not answered for 10 s")."""
        return UserError(f"ray: the cluster's head at {self.gcs_address} {how} (stopped, or out of reach); the files "
                         "finished are recorded: run the command again for the rest")


class RayCpuNotice:
    """Says once when a ray cluster that had no CPU as the run began (its nodes not started yet,
    or none with CPUs) has ended no call for NO_WORKER_NOTICE_SECONDS, and once more when calls
    end after that: ray held the tasks without a word. The run goes on waiting, as an
    autoscaler starts nodes for the tasks it holds."""

    def __init__(self, cpus: int, gcs_address: str, say: Callable[[str], None]):
        self.waiting_since = time.monotonic() if cpus == 0 else None
        self.gcs_address, self.say, self.said = gcs_address, say, False

    def nothing_ended(self) -> None:
        if self.waiting_since is None or self.said or time.monotonic() - self.waiting_since < NO_WORKER_NOTICE_SECONDS:
            return
        self.say(f"ray: the cluster at {self.gcs_address} had no CPU as the run began, and no call has ended in "
                 f"{NO_WORKER_NOTICE_SECONDS} s; the run waits (start a node with CPUs: ray start --address "
                 f"{self.gcs_address}; an autoscaler starts its own), or press Ctrl-C")
        self.said = True

    def ended(self) -> None:
        if self.said:
            self.say("ray: calls have begun to end; the run goes on")
        self.waiting_since, self.said = None, False


@contextmanager
def _started_here(backend: str) -> Iterator[None]:
    token = _STARTED_HERE.set(_STARTED_HERE.get() | {backend})
    try:
        yield
    finally:
        _STARTED_HERE.reset(token)


@contextmanager
def _signal_deferred(number: int) -> Iterator[None]:
    """The signal `number` held back during the block, and raised again as it ends if it came:
    blocked in this thread and in the threads and processes it starts (which keep the block),
    and, in the main thread, recorded by a handler of its own (another thread that does not
    block it, such as a BLAS pool's, may take it)."""
    came = []
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {number})
    main = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(number, lambda *_: came.append(True)) if main else None
    try:
        yield
    finally:  # (the mask first: one pending is then recorded, where the handler restored first raised it,
        # the mask left blocked)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        if main:
            signal.signal(number, previous_handler if previous_handler is not None else signal.SIG_DFL)
        if came:
            signal.raise_signal(number)


@contextmanager
def _signal_handled(number: int, handler) -> Iterator[None]:
    """`handler` for the signal `number` during the block, in the main thread (the only one
    that may set handlers; elsewhere nothing changes), and the handler before it after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(number, handler)
    try:
        yield
    finally:  # (None: a handler set outside Python, which cannot be set back from here)
        signal.signal(number, previous if previous is not None else signal.SIG_DFL)


def _dask_connect_seconds() -> float:
    """dask's connect timeout (`distributed.comm.timeouts.connect`, 30 s unless the user's dask
    configuration or DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT says otherwise), in seconds:
    the setting a dask user already knows, for a scheduler on a slow network or a quick refusal."""
    import dask.config
    from dask.utils import parse_timedelta

    value = dask.config.get("distributed.comm.timeouts.connect")
    try:
        seconds = parse_timedelta(value, default="seconds")
    except (KeyError, ValueError, TypeError):  # (a unit dask does not know is a KeyError)
        seconds = None
    if seconds is None or not seconds > 0:
        raise UserError(f"dask's setting distributed.comm.timeouts.connect is {value!r}: not a positive duration "
                        "(e.g. 30s); see DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT and your dask configuration")
    return seconds


@contextmanager
def _connect_dask(client_type, scheduler: str) -> Iterator[None]:
    """A client of the scheduler at `scheduler` for the block, or a one-line UserError within
    dask's connect timeout and a few seconds: dask's own timeout does not cover a server that
    accepts the connection and never answers (the dashboard's port given for the scheduler's),
    so connecting runs in a thread that is left behind if it never returns."""
    seconds = _dask_connect_seconds()
    waited = seconds + CONNECT_MARGIN_SECONDS
    client, error = _in_time(lambda: client_type(scheduler, timeout=seconds), "dask-connect", waited)
    if client is None:
        if isinstance(error, MemoryError):  # (a reply that is no dask message, read as an absurd length)
            reason = "what answered there is not a dask scheduler"
        else:
            reason = " ".join(str(error).split()) if error else f"no dask scheduler answered in {waited:g} s"
        raise UserError(f"--scheduler {scheduler}: cannot reach the dask scheduler ({reason})")
    try:
        yield
    finally:  # (a client that lost its scheduler logs its reconnect loop's traceback as the close cancels it)
        with _logger_silenced("distributed.client"):
            client.close()


@contextmanager
def _logger_silenced(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _in_time(connect: Callable[[], object], name: str, seconds: float) -> tuple[object | None, Exception | None]:
    """`connect()` run in a daemon thread for at most `seconds` (a client that retries for ever
    is left behind there): (its result, None), (None, its error), or (None, None) when it has
    not returned in time."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = connect()
        except Exception as error:  # reported by the caller, in the command's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome.get("result"), outcome.get("error")


def _host_and_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a host:port RAY_ADDRESS; None for "auto", ray:// and http:// addresses,
    which ray reports on itself."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^/:\s]+):(\d+)", address)
    return None if match is None else (match[1].strip("[]"), int(match[2]))


def _check_ray_address(address: str) -> None:
    """A one-line UserError when RAY_ADDRESS is host:port and nothing accepts a connection
    there: ray.init would retry for ever."""
    where = _host_and_port(address)
    if where is None:
        return
    try:
        with socket.create_connection(where, timeout=CONNECT_SECONDS / 2):
            pass
    except (OSError, ValueError) as error:  # (a malformed host name is a UnicodeError)
        raise UserError(f"ray: cannot reach the cluster at RAY_ADDRESS={address} ({error})") from None


def _check_ray_credentials(address: str) -> None:
    """A one-line UserError when the ray head at the host:port `address` refuses this process's
    credentials. A head uses token authentication when its token exists as it starts (ray's
    local instances, ours too, leave one in ~/.ray), and ray sends the token to an address it
    is given only with RAY_AUTH_MODE=token: ray.init had retried until the connection time ran
    out, then read as "no ray head answered", with a warning a second. ray's own GCS client
    says at once (its private API: where it is missing or fails otherwise, ray.init decides)."""
    if _host_and_port(address) is None:
        return
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:
        return
    try:
        GcsClient(address=address)
    except AuthenticationError as error:
        reason = " ".join(str(error).split()).split(". ")[0]
        where = "~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN"
        needed = f"the head's token here (in {where})" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" \
            else f"RAY_AUTH_MODE=token here, and its token in {where}"
        raise UserError(f"ray: the cluster at RAY_ADDRESS={address} refused this command ({reason}); a head that "
                        f"uses token authentication needs {needed}") from None
    except Exception:  # (ray.init meets it too, and reports it)
        return


class _RayNotices(logging.Filter):
    """Drops two notices ray prints on every run, about what the command chose for the user:
    that the local instance it starts uses token authentication (ray's secure default; its
    warning that authentication is off still shows), and that a connection to RAY_ADDRESS
    (made off the main thread, to be timed) sets no SIGTERM handler (the command's own stays)."""

    LOGGERS = ("ray._private.authentication.authentication_token_setup", "ray._private.worker")
    NOTICES = ("Token authentication is enabled for this Ray cluster",
               "SIGTERM handler is not set because current thread is not the main thread")

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
    except ImportError as error:
        raise _missing_extra("ray", error) from None
    with _ray_notices_dropped():
        if ray.is_initialized():  # the command's own session, or the caller's: theirs to end
            yield
        else:
            with _ray_connection(ray, jobs):
                yield


@contextmanager
def _ray_connection(ray, jobs: int) -> Iterator[None]:
    """A ray session at RAY_ADDRESS, or a local instance of `jobs` CPUs, for the block
    (RAY_ADDRESS=local too: ray's own name for that, started here as without it)."""
    address = os.environ.get("RAY_ADDRESS")
    address = None if address == "local" else address
    if address:
        _check_ray_address(address)
    # ("local": a new local instance, even where an earlier `ray start` left its address behind)
    options = {"address": address} if address else {"address": "local", "num_cpus": jobs, "include_dashboard": False}
    environment = dict(os.environ)
    try:
        with _ray_started(ray, address, options):
            yield
    finally:
        _restore_environment(environment)


@contextmanager
def _ray_started(ray, address: str | None, options: dict) -> Iterator[None]:
    """ray.init with `options` (in time, for an `address`) for the block, then ray.shutdown."""

    def start() -> bool:
        if address:
            _check_ray_credentials(address)
        ray.init(logging_level=logging.WARNING, **options)
        return True

    if address:  # in time: ray retries for ever where something answers but is no ray head
        started, error = _in_time(start, "ray-init", CONNECT_SECONDS)
    else:  # (off the main thread ray sets no SIGTERM handler, and says so: local runs start here)
        try:
            started, error = start(), None
        except Exception as caught:  # (sorted below, as the thread's)
            started, error = None, caught
    if not started:
        if error is not None and not isinstance(error, (ConnectionError, RuntimeError, ValueError)):
            raise error  # a refusal (a UserError's one line), or a bug (its traceback): no cluster out of reach
        reason = " ".join(str(error).split()) if error else f"no ray head answered in {CONNECT_SECONDS} s"
        raise UserError(f"ray: cannot start or reach the cluster{f' at {address}' if address else ''} ({reason})")
    try:
        # SIGTERM ends the command at once, as without ray (status 143; every file finished is
        # already recorded): ray's own handlers printed about 40 lines of C++ stack and aborted
        # (status 134), or, connected to RAY_ADDRESS, 8 lines and 143. Its workers' crash
        # reports are left as they are.
        with ExitStack() as stack:
            if not address:
                stack.enter_context(_started_here("ray"))
            stack.enter_context(_signal_handled(signal.SIGTERM, signal.SIG_DFL))
            yield
    finally:
        ray.shutdown()


def _restore_environment(environment: dict[str, str]) -> None:
    """os.environ as `environment` again (what changed in it during the session, by ray or
    not, is undone): ray.init leaves its own settings in this process's environment
    (RAY_AUTH_MODE=token after a local instance, among others), which the commands this
    process runs or starts later inherited: a connection to a head without token
    authentication then failed in ray's C++ check for a token."""
    for name in set(os.environ) - set(environment):
        del os.environ[name]
    os.environ.update(environment)


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


def started_here(backend: str) -> bool:
    """Whether the `backend` cluster in use was started by this command on this machine: its
    workers are this process's children, with its files and environment."""
    return backend in _STARTED_HERE.get()


def connected(backend: str) -> bool:
    """Whether this process has a session with a `backend` cluster."""
    if backend == "ray":
        import ray

        return ray.is_initialized()
    from dask.distributed import default_client

    try:
        default_client()
        return True
    except ValueError:
        return False

"""The batch runner behind every `dfd-data` command that works file by file.

It runs a module-level work function over tasks with joblib (loky processes by default, or
threads) or on a cluster through its own futures, dask's or ray's (see cluster.py), shows a
progress bar, keeps going when one file fails, also when a worker process dies on it (a crash
in native code, the kernel's out-of-memory killer), and ends with a one-line summary. Files that failed because a
worker's machine lacks what the step needs (errors.SetupError: weights, a device), which the
steps check on every machine of a cluster before they start (worker_check.py) but a worker
may still lack (one that joined later), are also counted per machine, one line each. Resume
is the caller's part: it leaves out tasks whose outputs are already complete and valid and
passes their count as `already_done`.

Networks work best on batches: with `batch_size`, the work function receives a list of
tasks and returns one result per task, where a result may be an exception instance (that
task failed or was skipped, the others did not).
"""
from __future__ import annotations

import itertools
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import joblib
from tqdm import tqdm

from .cluster import CLUSTER_BACKENDS, RayCpuNotice, RayHeadWatch, cluster_session, dask_worker_watch
from .errors import SetupError, UserError
from .parent_death import end_with_parent

BACKENDS = ("loky", "threading", *CLUSTER_BACKENDS)
# Calls given out to a ray cluster at a time, per CPU of it: enough to keep every CPU busy
# while results travel back, few enough that waiting on them stays cheap.
RAY_CALLS_PER_CPU = 4
_RAY_WAIT_SECONDS = 1.0  # the longest a ray run waits for a result before it looks at its head


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_budget() -> int:
    """CPU threads one process may use: OMP_NUM_THREADS where a launcher set it (joblib's
    loky workers, dask's nanny and ray workers each get their share that way, so workers
    never oversubscribe the cores), else every usable CPU."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return usable_cpus()


class SkipItem(Exception):
    """Raised by a work function when an input has nothing to produce (e.g. no face).

    It is reported like a failure but counted as a skip: the batch still succeeds.
    `result` carries what the caller should still record about the input."""

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class Task:
    key: str  # unique within the batch; used to attach results to records
    label: str  # what a person recognises in a report: usually the input file
    payload: Any = None


@dataclass
class Outcome:
    task: Task
    status: str  # "done" | "skipped" | "failed"
    result: Any = None
    message: str = ""
    lacking: str = ""  # a failure's cause where it is the worker's machine, not the file


@dataclass
class BatchSummary:
    step: str
    done: int = 0
    skipped: int = 0
    already_done: int = 0
    failed: int = 0
    seconds: float = 0.0
    reports: list[dict] = field(default_factory=list)
    not_images: int = 0  # files beside the inputs that are not images by their names
    lacking: dict[str, int] = field(default_factory=dict)  # "HOST lacks ...: cause" -> files failed so

    def count(self, outcome: Outcome) -> None:
        """Add one file's outcome (a report for each that was not done)."""
        if outcome.lacking:
            self.lacking[outcome.lacking] = self.lacking.get(outcome.lacking, 0) + 1
        if outcome.status == "done":
            self.done += 1
            return
        if outcome.status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
        self.reports.append({"step": self.step, "file": outcome.task.label, "status": outcome.status,
                             "reason": outcome.message})

    def lacking_lines(self) -> list[str]:
        """One line per machine that lacks what the step needs, after the summary line."""
        return [f"{self.step}: {count} of the failures because {cause}; run the command again once it has it"
                for cause, count in self.lacking.items()]

    def line(self) -> str:
        total_skipped = self.skipped + self.already_done
        detail = f" ({self.already_done} already done)" if self.already_done else ""
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        others = f"; {self.not_images} files without an image extension left alone" if self.not_images else ""
        return (f"{self.step}: {self.done} done, {total_skipped} skipped{detail}, {self.failed} failed "
                f"in {self.seconds:.1f} s ({rate:.2f}/s){others}")


def _outcome_of_error(task: Task, error: BaseException) -> Outcome:
    """A one-line outcome for an exception raised while working on `task`."""
    if isinstance(error, SkipItem):
        return Outcome(task, "skipped", result=error.result, message=str(error))
    if isinstance(error, SetupError):  # named by the machine it ran on: a cluster's workers differ
        cause = f"machine {socket.gethostname()} lacks what this step needs: {' '.join(str(error).split())}"
        return Outcome(task, "failed", message=f"{task.label}: {cause}", lacking=cause)
    message = " ".join(str(error).split()) or type(error).__name__
    if not message.startswith(task.label):
        last = traceback.extract_tb(error.__traceback__)[-1:]
        # where in the code an unexpected error came from; a user error's message is the whole story
        where = f" at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno}" if last and not isinstance(error, UserError) else ""
        message = f"{task.label}: {type(error).__name__}: {message}{where}"
    return Outcome(task, "failed", message=message)


def _run_task(work: Callable[[Task], Any], task: Task) -> list[Outcome]:
    """Runs in the worker: one task, every exception turned into an outcome."""
    try:
        return [Outcome(task, "done", work(task))]
    except Exception as error:  # one bad file must never stop the batch
        return [_outcome_of_error(task, error)]


def _run_batch_of_tasks(work: Callable[[list[Task]], list[Any]], tasks: list[Task]) -> list[Outcome]:
    """Runs in the worker: a batch of tasks; a result that is an exception fails its task only."""
    try:
        results = work(tasks)
    except Exception as error:  # the whole batch failed: say so for each of its files
        return [_outcome_of_error(task, error) for task in tasks]
    return [_outcome_of_error(task, result) if isinstance(result, BaseException) else Outcome(task, "done", result)
            for task, result in zip(tasks, results)]


def run_batch(
    step: str,
    tasks: Iterable[Task],
    work: Callable[[Task], Any],
    *,
    jobs: int = 1,
    backend: str = "loky",
    quiet: bool = False,
    already_done: int = 0,
    on_outcome: Callable[[Outcome], None] | None = None,
    unit: str = "img",
    batch_size: int | None = None,
) -> BatchSummary:
    """Run `work` over `tasks`; `on_outcome` is called in this process as each one ends."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    tasks = list(tasks)
    summary = BatchSummary(step, already_done=already_done)
    start = time.perf_counter()
    if tasks:
        if batch_size:
            calls = [joblib.delayed(_run_batch_of_tasks)(work, tasks[i:i + batch_size])
                     for i in range(0, len(tasks), batch_size)]
        else:
            calls = [joblib.delayed(_run_task)(work, task) for task in tasks]
        with cluster_session(backend, jobs), \
                tqdm(total=len(tasks), desc=step, unit=unit, disable=quiet, dynamic_ncols=True) as bar:
            for outcome in _outcomes(calls, jobs, backend):
                summary.count(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
                bar.update(1)
    summary.reports.sort(key=lambda report: report["file"])
    summary.seconds = time.perf_counter() - start
    return summary


# Errors that mean a worker process died (loky, ray, dask): anything else that reaches the
# runner from the pool (the work functions catch their own) is a call that could not run there.
_WORKER_DEATHS = {"TerminatedWorkerError", "BrokenProcessPool", "WorkerCrashedError", "OutOfMemoryError",
                  "NodeDiedError", "KilledWorker"}
# joblib dispatches calls in order, a few per worker ahead: the call whose worker died is among
# the first this many (per worker) of those left unfinished.
_SUSPECTS_PER_JOB = 4


def _lost(call, error: BaseException) -> list[Outcome]:
    """Failed outcomes for the tasks of a call that the pool could not run to its end."""
    _, args, _ = call
    tasks = args[1] if isinstance(args[1], list) else [args[1]]
    what = "the worker process died working on it (a crash in native code, or out of memory?)" \
        if type(error).__name__ in _WORKER_DEATHS else "it could not run in a worker process"
    reason = " ".join(str(error).split())[:160] or type(error).__name__
    return [Outcome(task, "failed", message=f"{task.label}: {what}: {type(error).__name__}: {reason}")
            for task in tasks]


def _outcomes(calls: list, jobs: int, backend: str) -> Iterator[Outcome]:
    """Outcomes as the calls finish. With joblib, a worker that dies ends the joblib call with
    an error, losing the calls in flight: the first few unfinished ones (the suspects) then run
    in groups of `jobs`, and a group that fails again one call at a time, until the call that
    kills its worker is found and reported as failed; the others go on in full passes."""
    if backend == "dask":
        yield from _dask_outcomes(calls)
        return
    if backend == "ray":
        yield from _ray_outcomes(calls, jobs)
        return
    finished: set[int] = set()
    left = list(range(len(calls)))
    while left:
        try:
            yield from _joblib_outcomes(calls, jobs, backend, finished, left)
            return
        except Exception:  # the work functions catch their own errors: this is the pool's
            if backend == "threading":  # no worker process to lose: this process's own failure
                raise
        left = [index for index in left if index not in finished]
        suspects, left = left[:_SUSPECTS_PER_JOB * jobs], left[_SUSPECTS_PER_JOB * jobs:]
        yield from _isolate(calls, jobs, backend, finished, suspects)


def _isolate(calls: list, jobs: int, backend: str, finished: set[int], suspects: list[int]) -> Iterator[Outcome]:
    """Outcomes of the `suspects` calls, run in groups of `jobs` and a failing group's calls one
    by one: the call whose worker dies alone is reported as failed."""
    for start in range(0, len(suspects), jobs):
        group = suspects[start:start + jobs]
        try:
            yield from _joblib_outcomes(calls, jobs, backend, finished, group)
            continue
        except Exception:
            pass
        for index in (i for i in group if i not in finished):
            try:
                yield from _joblib_outcomes(calls, jobs, backend, finished, [index])
            except Exception as error:
                finished.add(index)
                yield from _each_task_alone(calls[index], error,
                                            lambda call: list(_joblib_outcomes([call], jobs, backend, set(), [0])))


def _each_task_alone(call, error: BaseException, run_alone: Callable[[tuple], list[Outcome]]) -> Iterator[Outcome]:
    """Outcomes of a call that failed (with `error`) while it ran alone. Where its worker died,
    a batch's tasks then run alone each, through `run_alone(call)`, so that only the one that
    kills its worker fails: its batch-mates had failed with it, on every run again, as the
    batches are the same."""
    singles = _single_task_calls(call) if type(error).__name__ in _WORKER_DEATHS else None
    if singles is None:
        yield from _lost(call, error)
        return
    for single in singles:
        try:
            outcomes = run_alone(single)
        except UserError:  # (the run stops: see _stop_if_cancelled)
            raise
        except Exception as single_error:
            outcomes = _lost(single, single_error)
        yield from outcomes


def _single_task_calls(call) -> list[tuple] | None:
    """A batch call's tasks as calls of one task each; None for a call of one task."""
    function, args, kwargs = call
    if function is not _run_batch_of_tasks or len(args[1]) == 1:
        return None
    work, tasks = args
    return [(function, (work, [task]), kwargs) for task in tasks]


def _joblib_outcomes(calls: list, jobs: int, backend: str, finished: set[int],
                     chosen: list[int]) -> Iterator[Outcome]:
    """Outcomes of the `chosen` calls through joblib (loky or threading); adds each finished
    call's index to `finished`. With `jobs` above 1, even one call runs in a worker process
    (joblib would run a single job in this one, where a crash ends the command)."""
    indexed = [joblib.delayed(_indexed)(index, *calls[index]) for index in chosen]
    n_jobs = 1 if jobs <= 1 else max(2, min(jobs, len(indexed)))
    workers = {"initializer": _end_with_this_process, "initargs": (os.getpid(),)} if backend == "loky" else {}
    with joblib.parallel_config(backend=backend, n_jobs=n_jobs, **workers):
        for index, outcomes in joblib.Parallel(return_as="generator_unordered")(indexed):
            finished.add(index)
            yield from outcomes


class _ParentGone(BaseException):
    """Raised in a loky worker whose parent process has ended, through the call at work: its
    half-written outputs are removed on the way out (see atomic.py), as the work functions
    catch only Exception."""


_calls_at_work = 0  # (in a worker: whether a call runs, for the SIGTERM handler)


def _end_with_this_process(parent: int) -> None:
    """Runs in each loky worker as it starts (Linux): the kernel sends it SIGTERM when `parent`
    ends, and SIGTERM ends it, the call at work unwound first. Orphaned, loky's workers had gone
    on with the calls they held, their files never recorded, and held the command's output open
    until loky's idle timeout, 300 s, after the command itself was ended (SIGTERM, Ctrl-C
    twice, kill -9): a caller reading it waited that long. (Linux sends it when the thread
    that started the worker ends: the one that runs the batch, the main thread in a command.)"""
    if not sys.platform.startswith("linux"):
        return
    signal.signal(signal.SIGTERM, _on_sigterm_in_worker)
    end_with_parent(parent)


def _on_sigterm_in_worker(number: int, frame) -> None:
    signal.signal(number, signal.SIG_IGN)  # (once: a second must not cut the unwinding short)
    if _calls_at_work:
        raise _ParentGone()
    os._exit(128 + number)


def _indexed(index: int, function: Callable, args: tuple, kwargs: dict) -> tuple[int, list[Outcome]]:
    """Runs in the worker: `function(*args, **kwargs)` with the call's index, so that the
    runner knows which calls a dead worker left unfinished."""
    global _calls_at_work
    _calls_at_work += 1
    try:
        return index, function(*args, **kwargs)
    except _ParentGone:
        os._exit(128 + signal.SIGTERM)
    finally:
        _calls_at_work -= 1


def _dask_outcomes(calls: list) -> Iterator[Outcome]:
    """Outcomes as the calls finish on the session's dask cluster, through dask's own futures:
    joblib's dask backend never completes a call whose worker died (dask marks it failed,
    KilledWorker, once it has killed a few workers), and the run waited forever. dask blames
    every call a dying worker held, queued ones too: a call failed that way runs again
    alone, and only one that kills its workers then is reported. A cluster without workers is
    reported while the run waits for one (see cluster.dask_worker_watch)."""
    from dask.distributed import as_completed, get_client

    client = get_client()
    futures = {client.submit(function, *args, pure=False, **kwargs): (function, args, kwargs)
               for function, args, kwargs in calls}
    blamed = []
    with dask_worker_watch(client, lambda notice: tqdm.write(notice, file=sys.stderr)):
        for future in as_completed(futures):
            try:
                outcomes = future.result()
            except Exception as error:  # the work functions catch their own errors: this is the cluster's
                _stop_if_cancelled(client, error)
                if type(error).__name__ == "KilledWorker":
                    blamed.append(futures[future])
                    outcomes = []
                else:
                    outcomes = _lost(futures[future], error)
            future.release()
            yield from outcomes
        for call in blamed:
            try:
                outcomes = _dask_result(client, call)
            except UserError:  # (the run stops: see _stop_if_cancelled)
                raise
            except Exception as error:
                outcomes = _each_task_alone(call, error, lambda single: _dask_result(client, single))
            yield from outcomes


def _dask_result(client, call) -> list[Outcome]:
    """The outcomes of one call run on the dask cluster (its error, if the cluster's; see
    _stop_if_cancelled)."""
    function, args, kwargs = call
    future = client.submit(function, *args, pure=False, **kwargs)
    try:
        return future.result()
    except Exception as error:
        _stop_if_cancelled(client, error)
        raise
    finally:
        future.release()


def _stop_if_cancelled(client, error: BaseException) -> None:
    """A one-line UserError where dask cancelled a call rather than ran it (the client lost the
    scheduler, or someone cancelled the work): its files were never tried, and had each been
    recorded as failed. Those finished are recorded; running the command again does the rest."""
    reason = getattr(error, "reason", None)
    if type(error).__name__ != "FutureCancelledError" or reason is None:
        return
    where = getattr(client.scheduler, "address", None) or "its address"
    cause = "lost the connection to the scheduler at " + where if reason == "scheduler-connection-lost" else \
        f"had its work cancelled ({reason})"
    raise UserError(f"dask: the run {cause}; the files finished are recorded: run the command again for the rest")


def _ray_outcomes(calls: list, jobs: int) -> Iterator[Outcome]:
    """Outcomes as the calls finish on the session's ray cluster, through ray's own tasks, at
    most RAY_CALLS_PER_CPU per CPU the cluster has as the run starts, or `jobs` if more (an
    autoscaling cluster grows for the calls it is given), given out at a time.
    joblib's ray backend returns results only as a whole list: the run had gone in rounds, and
    Ctrl-C, SIGTERM or a lost head discarded the finished files of the round at work, and its
    slowest call held up the next round. A head that is gone stops the run with one line (see
    cluster.RayHeadWatch), also where a call fails as it goes: its files are not failures.
    ray names the call whose worker died (none is retried by ray): that call runs once more,
    in case its machine rather than its file failed (a node that died fails all its calls),
    and a batch that fails so again runs a task at a time, as with dask; each among the other
    calls, waited for as they are. A cluster without CPUs is reported while the run waits for
    one (see cluster.RayCpuNotice)."""
    import ray

    remote = ray.remote(max_retries=0)(_called)
    head = RayHeadWatch(ray.get_runtime_context().gcs_address)
    # (counted once: asked again during the run, the cluster's resources waited 60 s on a lost head)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    window = max(jobs, RAY_CALLS_PER_CPU * max(cpus, 1))
    no_cpu = RayCpuNotice(cpus, head.gcs_address, lambda notice: tqdm.write(notice, file=sys.stderr))
    waiting, pending = iter(calls), {}  # pending: reference -> (call, how many times it ran before)
    while True:
        for call in itertools.islice(waiting, max(0, window - len(pending))):
            pending[remote.remote(*call)] = call, 0
        if not pending:
            return
        head.check()  # (at most once a second, whether calls end or not)
        # (in steps: Python sees Ctrl-C between them; then every call that has ended, in one look)
        if not ray.wait(list(pending), num_returns=1, timeout=_RAY_WAIT_SECONDS)[0]:
            no_cpu.nothing_ended()
            continue
        no_cpu.ended()
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for reference in ready:
            call, runs = pending.pop(reference)
            try:
                outcomes = ray.get(reference)
            except Exception as error:  # the work functions catch their own errors: this is the cluster's
                death = type(error).__name__ in _WORKER_DEATHS
                if not death and not head.answers():  # (a call lost with its head: no failure of its files)
                    raise head.lost("stopped answering") from None
                again = [call] if death and runs == 0 else _single_task_calls(call) if death and runs == 1 else None
                outcomes = _lost(call, error) if again is None else []
                for retry in again or []:
                    pending[remote.remote(*retry)] = retry, runs + 1
            yield from outcomes


def _called(function: Callable, args: tuple, kwargs: dict):
    """Runs in a ray worker: one call."""
    return function(*args, **kwargs)

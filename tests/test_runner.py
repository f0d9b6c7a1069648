"""The batch runner: failures and skips are collected, never abort, on both backends."""
from __future__ import annotations

import os
import signal

import pytest

from dfd_data.runner import SkipItem, Task, run_batch


def square_or_fail(task: Task) -> int:
    if task.payload == 3:
        raise ValueError("three is not allowed\nsecond line")
    if task.payload == 5:
        raise SkipItem(f"{task.label}: nothing to do here", result="kept")
    return task.payload ** 2


@pytest.mark.parametrize("backend", ["loky", "threading"])
def test_failures_and_skips_do_not_stop_the_batch(backend):
    seen = {}
    tasks = [Task(str(i), f"file{i}.png", i) for i in range(8)]
    summary = run_batch("demo", tasks, square_or_fail, jobs=2, backend=backend, quiet=True, already_done=4,
                        on_outcome=lambda outcome: seen.__setitem__(outcome.task.key, outcome))
    assert (summary.done, summary.skipped, summary.failed, summary.already_done) == (6, 1, 1, 4)
    assert seen["2"].result == 4 and seen["5"].result == "kept"
    failed = next(r for r in summary.reports if r["status"] == "failed")
    assert failed["reason"].startswith("file3.png: ValueError: three is not allowed second line at test_runner.py:")
    assert summary.line().startswith("demo: 6 done, 5 skipped (4 already done), 1 failed in ")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend"):
        run_batch("demo", [], square_or_fail, backend="mpi")


def square_batch(tasks: list[Task]) -> list:
    if any(task.payload == 99 for task in tasks):
        raise RuntimeError("the whole batch broke")
    return [ValueError(f"{t.label}: odd one out") if t.payload == 3 else t.payload ** 2 for t in tasks]


def test_batches_fail_per_item_or_as_a_whole():
    seen = {}
    tasks = [Task(str(i), f"f{i}", i) for i in (0, 3, 2, 4, 99, 6)]
    summary = run_batch("demo", tasks, square_batch, batch_size=3, quiet=True,
                        on_outcome=lambda outcome: seen.__setitem__(outcome.task.key, outcome))
    assert (summary.done, summary.failed) == (2, 4)  # f3 alone; f4, f99 and f6 share the broken batch
    assert seen["2"].result == 4 and seen["3"].message == "f3: odd one out"
    assert seen["6"].message.startswith("f6: RuntimeError: the whole batch broke")


def sketch_unless_weights_missing(tasks: list[Task]) -> list:
    """Fails as a worker without the HED weights does: every file, with the same error."""
    from dfd_data.errors import ModelMissingError

    missing = ModelMissingError("HED weights not found at /w/hed.safetensors; fetch them with `dfd-data weights "
                                "fetch hed`")
    return [missing if task.payload >= 4 else task.payload for task in tasks]


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_worker_without_the_weights_stops_the_run_and_keeps_what_was_done(jobs):
    """A worker whose machine lacks the weights would fail every file it took (and take them
    fast, ahead of the healthy workers): the run stops with one line naming the machine, and
    the files finished before stay recorded for the next run to resume from."""
    import socket

    from dfd_data.errors import UserError

    recorded = []
    tasks = [Task(str(i), f"f{i}.png", i) for i in range(12)]
    with pytest.raises(UserError) as stopped:
        run_batch("build-sketches:hed", tasks, sketch_unless_weights_missing, jobs=jobs, batch_size=2, quiet=True,
                  on_outcome=lambda outcome: recorded.append(outcome))
    message = str(stopped.value)
    assert message.startswith(f"build-sketches:hed: stopped, because a worker cannot run it: {socket.gethostname()} "
                              "(pid ") and "\n" not in message
    assert "HED weights not found at /w/hed.safetensors; fetch them with `dfd-data weights fetch hed`" in message
    assert all(outcome.status == "done" for outcome in recorded) and len(recorded) <= 4
    assert f"the {len(recorded)} files done before are kept" in message
    if jobs == 1:
        assert [outcome.task.key for outcome in recorded] == ["0", "1", "2", "3"]
        assert f"(pid {os.getpid()})" in message
    else:  # (the outcome is made in the worker process, which names itself)
        assert f"(pid {os.getpid()})" not in message


def test_network_threads_follow_the_workers_share(monkeypatch):
    """A worker that joblib, dask or ray gave OMP_NUM_THREADS=1 runs torch on one thread, not
    on every core (which would oversubscribe the machine as many times as there are workers)."""
    import torch

    from dfd_data.devices import cpu_threads
    from dfd_data.runner import thread_budget, usable_cpus

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with cpu_threads():
        assert torch.get_num_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert thread_budget() == usable_cpus()


def square_or_die(task: Task) -> int:
    """Kills its own worker process on payload 6, as a crash in native code or the kernel's
    out-of-memory killer would."""
    if task.payload == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return task.payload ** 2


@pytest.mark.parametrize("backend, count", [("loky", 10), ("loky", 7), ("dask", 10)])
def test_a_worker_killed_by_one_file_fails_that_file_only(backend, count):
    """The dead worker's file is reported as failed and every other file is done: loky had
    aborted the batch with a traceback, joblib's dask backend waited for ever. (With 7 files
    the search for the culprit ends on a single call, which must still run in a worker.)"""
    if backend == "dask":
        pytest.importorskip("dask.distributed", reason="the [dask] extra is not installed")
    seen = {}
    tasks = [Task(str(i), f"file{i}.png", i) for i in range(count)]
    summary = run_batch("demo", tasks, square_or_die, jobs=2, backend=backend, quiet=True,
                        on_outcome=lambda outcome: seen.__setitem__(outcome.task.key, outcome))
    assert (summary.done, summary.failed) == (count - 1, 1)
    assert {key: outcome.result for key, outcome in seen.items() if key != "6"} == \
        {str(i): i ** 2 for i in range(count) if i != 6}
    assert seen["6"].message.startswith("file6.png: the worker process died working on it")

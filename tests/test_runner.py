"""The batch runner: failures and skips are collected, never abort, on both backends."""
from __future__ import annotations

import os
import signal

import pytest

from dfd_data.runner import SkipItem, Task, run_batch
from tests.conftest import REPO, running, skip_without_extra


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
    """Fails as a worker without the HED weights does, from the fifth file on."""
    from dfd_data.errors import ModelMissingError

    missing = ModelMissingError("HED weights not found at /w/hed.safetensors; fetch them with `dfd-data weights "
                                "fetch hed`")
    return [missing if task.payload >= 4 else task.payload for task in tasks]


@pytest.mark.parametrize("jobs", [1, 2])
def test_files_failed_for_what_a_machine_lacks_name_the_machine_once(jobs):
    """On a cluster the command checks its own machine's weights, not the workers': a worker
    without them fails every file it takes, each reported with the machine's name, and the
    summary says in one line how many failed for that cause. The rest run and are recorded."""
    import socket

    recorded = []
    tasks = [Task(str(i), f"f{i}.png", i) for i in range(12)]
    summary = run_batch("build-sketches:hed", tasks, sketch_unless_weights_missing, jobs=jobs, batch_size=2,
                        quiet=True, on_outcome=lambda outcome: recorded.append(outcome))
    cause = (f"machine {socket.gethostname()} lacks what this step needs: HED weights not found at /w/hed.safetensors; "
             "fetch them with `dfd-data weights fetch hed`")
    assert (summary.done, summary.failed) == (4, 8) and len(recorded) == 12
    assert sorted(o.task.key for o in recorded if o.status == "done") == ["0", "1", "2", "3"]
    assert {report["reason"] for report in summary.reports} == {f"f{i}.png: {cause}" for i in range(4, 12)}
    assert summary.lacking_lines() == [f"build-sketches:hed: 8 of the failures because {cause}; run the command "
                                       "again once it has it"]


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


@pytest.mark.parametrize("backend, count", [("loky", 10), ("loky", 7), ("dask", 10), ("ray", 10)])
def test_a_worker_killed_by_one_file_fails_that_file_only(backend, count):
    """The dead worker's file is reported as failed and every other file is done: loky had
    aborted the batch with a traceback, joblib's dask backend waited for ever. (With 7 files
    the search for the culprit ends on a single call, which must still run in a worker.)"""
    skip_without_extra(backend)
    seen = {}
    tasks = [Task(str(i), f"file{i}.png", i) for i in range(count)]
    summary = run_batch("demo", tasks, square_or_die, jobs=2, backend=backend, quiet=True,
                        on_outcome=lambda outcome: seen.__setitem__(outcome.task.key, outcome))
    assert (summary.done, summary.failed) == (count - 1, 1)
    assert {key: outcome.result for key, outcome in seen.items() if key != "6"} == \
        {str(i): i ** 2 for i in range(count) if i != 6}
    assert seen["6"].message.startswith("file6.png: the worker process died working on it")


def squares_or_die(tasks: list[Task]) -> list:
    """square_or_die over a batch, as a network's batch work function runs."""
    return [square_or_die(task) for task in tasks]


@pytest.mark.parametrize("backend", ["loky", "dask", "ray"])
def test_a_worker_killed_by_one_file_of_a_batch_fails_that_file_only(backend):
    """A batch whose worker dies is run again a task at a time once it is found: its other
    files are done, where they had failed with it (and again on every run, as the batches are
    the same)."""
    skip_without_extra(backend)
    seen = {}
    tasks = [Task(str(i), f"file{i}.png", i) for i in range(9)]
    summary = run_batch("demo", tasks, squares_or_die, jobs=2, backend=backend, quiet=True, batch_size=3,
                        on_outcome=lambda outcome: seen.__setitem__(outcome.task.key, outcome))
    assert (summary.done, summary.failed) == (8, 1), summary.reports
    assert {key: outcome.result for key, outcome in seen.items() if key != "6"} == \
        {str(i): i ** 2 for i in range(9) if i != 6}
    assert seen["6"].message.startswith("file6.png: the worker process died working on it")


def die_once_then_take_long(task: Task) -> int:
    """The file whose label names a marker that is not there yet kills its worker (and leaves the
    marker); run again it takes 5 s. The others take 0.3 s."""
    import time
    from pathlib import Path

    if task.payload == 0:
        marker = Path(task.label)
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(5)
    else:
        time.sleep(0.3)
    return task.payload


def test_a_ray_run_records_the_other_files_while_a_call_whose_worker_died_runs_again(tmp_path):
    """The call whose worker died ran again with a blocking wait of its own: meanwhile nothing
    was recorded or given out, Ctrl-C lost what had ended, and a head lost then went unseen
    until ray ended the command from C++ 60 s later. It now runs among the others."""
    skip_without_extra("ray")
    order = []
    tasks = [Task(str(i), str(tmp_path / "died") if i == 0 else f"file{i}.png", i) for i in range(20)]
    summary = run_batch("demo", tasks, die_once_then_take_long, jobs=2, backend="ray", quiet=True,
                        on_outcome=lambda outcome: order.append(outcome.task.payload))
    assert (summary.done, summary.failed) == (20, 0), summary.reports
    assert order.index(0) >= 10, order  # (19 files of 0.3 s on the other CPU while it takes 5 s)


def write_or_die_mid_write(tasks: list[Task]) -> list:
    """Writes each task's file through a temporary one; on payload 6 the worker dies between
    the two, as a worker killed while its pool is torn down does."""
    from pathlib import Path

    from dfd_data.atomic import TEMP_PREFIX, atomic_write_text

    results = []
    for task in tasks:
        folder = Path(task.label).parent / "out"  # (the label is the input file's path)
        if task.payload == 6:
            (folder / f"{TEMP_PREFIX}{task.key}").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write_text(folder / task.key, str(task.payload))
        results.append({"id": task.key, "input": "in.txt", "input_sha256": "", "outputs": {}})
    return results


def test_a_step_leaves_no_temporary_file_of_a_worker_killed_mid_write(tmp_path):
    """The temporary files of workers that died mid-write are swept as the step ends (they had
    stayed until the next run, and `verify` failed on the finished dataset)."""
    from dfd_data.dataset import Dataset
    from dfd_data.derived import run_derived_step

    dataset = Dataset(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "in.txt").write_text("input")
    summary, done = run_derived_step(dataset, "demo", "out", {str(i): "in.txt" for i in range(8)}, "recipe",
                                     lambda key, _: int(key), write_or_die_mid_write, jobs=2, backend="loky",
                                     quiet=True, batch_size=1)
    assert (summary.done, summary.failed) == (7, 1)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == \
        sorted([*(str(i) for i in range(8) if i != 6), "records.jsonl"])


def pid_after_a_while(task: Task) -> int:
    """The worker's pid, after 0.3 s of work, also as a file name in PAYLOAD/pids; task 0 first
    writes one of its item's two files in PAYLOAD/item, then waits 60 s before the second."""
    import time
    from pathlib import Path

    from dfd_data.atomic import all_or_none

    (Path(task.payload) / "pids" / str(os.getpid())).touch()
    if task.key == "0":
        with all_or_none(Path(task.payload) / "item") as write:
            write("first.txt", b"1")
            time.sleep(60)
            write("second.txt", b"2")
    time.sleep(0.3)
    return os.getpid()


# Runs 60 tasks of pid_after_a_while on 2 loky workers; prints each result (a worker's pid) as
# it comes.
_PRINT_THE_WORKERS = """
import sys
from dfd_data.runner import Task, run_batch
from tests.test_runner import pid_after_a_while

run_batch("demo", [Task(str(i), f"file{i}.png", sys.argv[1]) for i in range(60)], pid_after_a_while, jobs=2,
          quiet=True, on_outcome=lambda outcome: print(outcome.result, flush=True))
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_loky_workers_end_with_the_process_that_runs_them(tmp_path, signal_name):
    """A command ended by SIGTERM (or kill -9) left its loky workers orphaned: they went on
    with the files they held, never recorded, and held its output open for loky's idle timeout
    (300 s), so that a caller reading it waited that long. Now each worker ends with it, the
    item it was writing removed (one file of two had stayed)."""
    import subprocess
    import sys
    import time

    (tmp_path / "pids").mkdir()
    run = subprocess.Popen([sys.executable, "-c", _PRINT_THE_WORKERS, str(tmp_path)], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # (a few files done: the other worker is at work too)
            run.stdout.readline()
        workers = {int(path.name) for path in (tmp_path / "pids").iterdir()}
        assert len(workers) == 2 and (tmp_path / "item" / "first.txt").exists(), workers
        run.send_signal(getattr(signal, signal_name))
        started = time.monotonic()
        run.communicate(timeout=60)  # (the output's end: every process that held it is gone)
        assert run.returncode == -getattr(signal, signal_name) and time.monotonic() - started < 10
    finally:
        run.kill()
    assert not [pid for pid in workers if running(pid)]
    deadline = time.monotonic() + 5
    while list((tmp_path / "item").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list((tmp_path / "item").iterdir()) == []

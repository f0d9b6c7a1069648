"""The batch runner: failures and skips are collected, never abort, on both backends."""
from __future__ import annotations

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

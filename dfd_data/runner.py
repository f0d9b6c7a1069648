"""The batch runner behind every `dfd-data` command that works file by file.

It runs a module-level work function over tasks with joblib (loky processes by default,
or threads), shows a progress bar, keeps going when one file fails, and ends with a one-line
summary. Resume is the caller's part: it leaves out tasks whose outputs are already
complete and valid and passes their count as `already_done`.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import joblib
from tqdm import tqdm

BACKENDS = ("loky", "threading")


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


@dataclass
class BatchSummary:
    step: str
    done: int = 0
    skipped: int = 0
    already_done: int = 0
    failed: int = 0
    seconds: float = 0.0
    reports: list[dict] = field(default_factory=list)

    def line(self) -> str:
        total_skipped = self.skipped + self.already_done
        detail = f" ({self.already_done} already done)" if self.already_done else ""
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.step}: {self.done} done, {total_skipped} skipped{detail}, {self.failed} failed "
                f"in {self.seconds:.1f} s ({rate:.2f}/s)")


def _run_task(work: Callable[[Task], Any], task: Task) -> Outcome:
    """Runs in the worker: turns every exception into a one-line outcome."""
    try:
        return Outcome(task, "done", work(task))
    except SkipItem as skip:
        return Outcome(task, "skipped", result=skip.result, message=str(skip))
    except Exception as error:  # one bad file must never stop the batch
        message = " ".join(str(error).split()) or type(error).__name__
        if not message.startswith(task.label):
            last = traceback.extract_tb(error.__traceback__)[-1:]
            where = f" at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno}" if last else ""
            message = f"{task.label}: {type(error).__name__}: {message}{where}"
        return Outcome(task, "failed", message=message)


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
) -> BatchSummary:
    """Run `work` over `tasks`; `on_outcome` is called in this process as each one ends."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    tasks = list(tasks)
    summary = BatchSummary(step, already_done=already_done)
    start = time.perf_counter()
    if tasks:
        n_jobs = max(1, min(jobs, len(tasks)))
        parallel = joblib.Parallel(n_jobs=n_jobs, backend=backend, return_as="generator_unordered")
        outcomes = parallel(joblib.delayed(_run_task)(work, task) for task in tasks)
        with tqdm(total=len(tasks), desc=step, unit=unit, disable=quiet, dynamic_ncols=True) as bar:
            for outcome in outcomes:
                if outcome.status == "done":
                    summary.done += 1
                elif outcome.status == "skipped":
                    summary.skipped += 1
                else:
                    summary.failed += 1
                if outcome.status != "done":
                    summary.reports.append({"step": step, "file": outcome.task.label,
                                            "status": outcome.status, "reason": outcome.message})
                if on_outcome is not None:
                    on_outcome(outcome)
                bar.update(1)
    summary.reports.sort(key=lambda report: report["file"])
    summary.seconds = time.perf_counter() - start
    return summary

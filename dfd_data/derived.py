"""Running a step that derives files from each aligned image (sketches, component crops).

Such a step keeps its records in <out_dir>/records.jsonl: per image id, the input file and
its sha256, the outputs with theirs, the step's recipe (a fingerprint of its parameters and
weights) and, where the input was itself derived, the digest of what it was derived from
("upstream": a sketch's aligned photo). An image is redone when its input, its upstream or
the recipe changed or any output is missing or altered; records of images that left the
dataset, or that failed this time, are dropped together with their files.
"""
from __future__ import annotations

from typing import Any, Callable

from .atomic import remove_stale_temp_files, sha256_file
from .dataset import Dataset, RecordLog
from .runner import BatchSummary, Outcome, Task, run_batch


def is_complete(dataset: Dataset, record: dict | None, input_relpath: str, recipe: str,
                upstream: str | None = None) -> bool:
    if not record or record.get("input") != input_relpath or record.get("recipe") != recipe \
            or record.get("upstream") != upstream:
        return False
    paths = [input_relpath, *record["outputs"]]
    digests = [record["input_sha256"], *record["outputs"].values()]
    return all(dataset.path(p).is_file() and sha256_file(dataset.path(p)) == d for p, d in zip(paths, digests))


def run_derived_step(dataset: Dataset, step: str, out_dir: str, inputs: dict[str, str], recipe: str,
                     payload: Callable[[str, str], Any], work: Callable, *, jobs: int, backend: str,
                     quiet: bool, batch_size: int | None = None, upstream: dict[str, str] | None = None
                     ) -> tuple[BatchSummary, list[str]]:
    """Bring <out_dir> up to date for `inputs` (image id -> input relpath), and for `upstream`
    (image id -> digest of what its input was made from) where given.

    `payload(id, input_relpath)` makes what `work` needs for one image; `work` returns the
    image's record (with "id", "input", "input_sha256", "outputs"). Returns the summary and
    the sorted ids that now have complete outputs."""
    upstream = upstream or {}
    log = RecordLog(dataset.path(out_dir) / "records.jsonl")

    def forget(record_id: str) -> None:
        for relpath in log.by_id.get(record_id, {}).get("outputs", {}):
            dataset.path(relpath).unlink(missing_ok=True)
        log.remove(record_id)

    for stale in [i for i in log.by_id if i not in inputs]:
        forget(stale)
    pending = [i for i in sorted(inputs)
               if not is_complete(dataset, log.by_id.get(i), inputs[i], recipe, upstream.get(i))]
    tasks = [Task(i, str(dataset.path(inputs[i])), payload(i, inputs[i])) for i in pending]

    def on_outcome(outcome: Outcome) -> None:
        if outcome.status == "done":
            key = outcome.task.key
            log.put({**outcome.result, "recipe": recipe, **({"upstream": upstream[key]} if key in upstream else {})})
        else:
            forget(outcome.task.key)

    with log:
        summary = run_batch(step, tasks, work, jobs=jobs, backend=backend, quiet=quiet, batch_size=batch_size,
                            already_done=len(inputs) - len(pending), on_outcome=on_outcome)
    remove_stale_temp_files(dataset.path(out_dir))  # (a pool torn down after a worker died killed others mid-write)
    dataset.remove_unrecorded_images(out_dir, log.by_id.values())
    dataset.replace_errors(step, summary.reports)
    return summary, sorted(log.by_id)

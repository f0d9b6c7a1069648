"""Running a recipe: an ordered list of steps, each a `dfd-data` / `dfd-model` command or a
small Python function, with one manifest (`pipeline.json`) for the whole run.

A step is skipped when the manifest records it finished with the same command, its declared
outputs are still there and no step before it changed anything in this run (a step that ran
may have changed what the later ones read; a data step that changed nothing leaves its
dataset's manifest byte for byte as it was); otherwise it runs (the commands resume their own
partial work, so an interrupted step picks up where it stopped). A step that failed on some
files only is not finished: the next run tries it again. The first failing step stops the run
with its exit status; the manifest says which step failed and how long each took. A
termination signal (kill, a closed terminal) reaches the running step too, and the step is
recorded as failed, so that no step goes on alone and a rerun starts it afresh.
"""
from __future__ import annotations

import hashlib
import json
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dfd_data.atomic import atomic_write_text
from dfd_data.errors import UserError

MANIFEST = "pipeline.json"
# The toolkit's command lines, run with this interpreter so a virtual environment is kept.
TOOLS = {"dfd-data": "dfd_data", "dfd-model": "dfd_model"}


class PipelineError(UserError):
    """A step that failed; one line naming it. The pipeline exits with the step's status."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Step:
    """One step: `command` (argv starting with dfd-data or dfd-model) or `function` (called with
    no arguments), and the paths that exist once it has finished. `partial_ok`: the step
    processes many files and exits with status 1 when some failed (each is listed in the
    dataset's errors.jsonl); the run goes on when its outputs exist all the same."""

    name: str
    description: str
    command: list[str] | None = None
    function: Callable[[], None] | None = None
    outputs: list[Path] = field(default_factory=list)
    partial_ok: bool = False
    # What a function step works on (its inputs' paths): a function's name alone does not say.
    key: str = ""
    # A file that changes whenever the step changes what later steps read (a dataset's manifest).
    state: Path | None = None

    def fingerprint(self) -> str:
        what = self.command if self.command is not None else f"{self.function.__module__}.{self.function.__qualname__}"
        return hashlib.sha256(json.dumps([what, self.key] if self.key else what).encode()).hexdigest()[:16]

    def shown(self) -> str:
        return shlex.join(self.command) if self.command else f"(python) {self.description}"


def _argv(command: list[str]) -> list[str]:
    tool, *rest = command
    if tool not in TOOLS:
        raise ValueError(f"pipeline commands must start with {' or '.join(TOOLS)}, got {tool!r}")
    return [sys.executable, "-m", TOOLS[tool], *rest]


def _run_command(argv: list[str]) -> int:
    """Run one step's command; a SIGTERM or SIGHUP sent to the pipeline is passed on to it,
    one that arrives while it starts included (the pipeline had died of it, the step left
    running). One that finds no step running (its start failed, or it has just ended) is
    raised again once the pipeline's own handlers are back: the pipeline stops."""
    if threading.current_thread() is not threading.main_thread():  # (signal handlers live in the main thread)
        return subprocess.Popen(argv).wait()
    child, pending = None, []

    def forward(received: int, _frame) -> None:
        if child is not None and child.returncode is None:
            child.send_signal(received)
            if child.returncode is None:  # (sent: send_signal reaps a child that has ended, and sends nothing)
                return
        pending.append(received)

    previous = {number: signal.signal(number, forward) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        child = subprocess.Popen(argv)
        early = pending.copy()
        pending.clear()
        for received in early:
            forward(received, None)
        return child.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for received in pending:
            signal.raise_signal(received)


def _failure(code: int) -> tuple[str, int]:
    """How a step's exit status reads, and the pipeline's own exit status for it."""
    if code >= 0:
        return f"exit status {code}", code
    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    return f"killed by {name}{' (out of memory?)' if -code == signal.SIGKILL else ''}", 128 - code


def _digest(path: Path | None) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else None


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def run_pipeline(name: str, steps: list[Step], out: Path, echo=print) -> dict:
    """Run `steps` in order into `out`; returns the manifest (also written to out/pipeline.json)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST
    previous = {row["name"]: row for row in _load(path).get("steps", [])}
    manifest = {"pipeline": name, "out": str(out), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": []}
    started, ran = time.time(), False
    for number, step in enumerate(steps, 1):
        header = f"[{number}/{len(steps)}] {step.name}: {step.description}"
        before = previous.get(step.name, {})
        row = {"name": step.name, "description": step.description, "command": step.shown(),
               "fingerprint": step.fingerprint()}
        if not ran and before.get("status") == "done" and before.get("fingerprint") == row["fingerprint"] \
                and all(p.exists() for p in step.outputs):
            echo(f"{header} (already done, skipped)")
            manifest["steps"].append({**row, "status": "done", "seconds": before.get("seconds"), "skipped": True})
            continue
        echo(f"{header}\n    $ {step.shown()}")
        tick, state = time.time(), _digest(step.state)
        manifest["steps"].append({**row, "status": "running"})
        atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
        if step.command is not None:
            code = _run_command(_argv(step.command))
        else:
            try:
                step.function()
                code = 0
            except UserError as error:
                echo(f"    {error}")
                code = 1
        status = "done" if code == 0 else "failed"
        if code == 1 and step.partial_ok and step.outputs and all(p.exists() for p in step.outputs):
            echo(f"    {step.name} failed on some files (listed in errors.jsonl); going on with the rest")
            status = "partial"  # not finished: the next run tries the failed files again
        ran = ran or step.state is None or _digest(step.state) != state
        manifest["steps"][-1].update(status=status, seconds=round(time.time() - tick, 1), returncode=code)
        manifest["total_seconds"] = round(time.time() - started, 1)
        atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
        if status == "failed":
            how, exit_code = _failure(code)
            raise PipelineError(f"pipeline {name}: step {step.name} failed ({how}); fix the cause and "
                                f"rerun the same command to continue from it", exit_code)
    manifest["total_seconds"] = round(time.time() - started, 1)
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return manifest


__all__ = ["MANIFEST", "PipelineError", "Step", "run_pipeline"]

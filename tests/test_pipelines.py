"""dfd-pipeline: the runner's skip/resume/failure rules, the CelebAMask-HQ selection, and the
demo recipe end to end (with 2 training steps per stage, so it takes about a minute)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import pytest

from dfd_data.errors import UserError
from pipelines.full_size import RecipeError, select_celebamask
from pipelines.runner import PipelineError, Step, run_pipeline
from tests.conftest import REPO


def _touch(path: Path, log: list, name: str):
    def work():
        log.append(name)
        path.write_text(name)
    return work


def test_finished_steps_are_skipped_and_a_failure_stops_the_run(tmp_path):
    log: list[str] = []
    steps = [Step("one", "first", function=_touch(tmp_path / "one.txt", log, "one"), outputs=[tmp_path / "one.txt"]),
             Step("two", "second", command=["dfd-data", "verify", str(tmp_path / "missing")],
                  outputs=[tmp_path / "two.txt"])]
    with pytest.raises(PipelineError, match="step two failed"):
        run_pipeline("test", steps, tmp_path, echo=lambda line: None)
    manifest = json.loads((tmp_path / "pipeline.json").read_text())
    assert [(s["name"], s["status"]) for s in manifest["steps"]] == [("one", "done"), ("two", "failed")]

    steps[1] = Step("two", "second", function=_touch(tmp_path / "two.txt", log, "two"), outputs=[tmp_path / "two.txt"])
    lines: list[str] = []
    run_pipeline("test", steps, tmp_path, echo=lines.append)
    assert log == ["one", "two"]  # step one was not run again
    assert any("one: first (already done, skipped)" in line for line in lines)
    (tmp_path / "one.txt").unlink()  # an output went missing: the step runs again, and every step after it
    run_pipeline("test", steps, tmp_path, echo=lambda line: None)
    assert log == ["one", "two", "one", "two"]


def test_a_step_that_failed_on_some_files_is_tried_again(tmp_path):
    """A partial_ok step that exits 1 with its outputs present lets the run go on, but is not
    finished: the next run tries it again. Any other failure (a usage error exits 2) stops."""
    (tmp_path / "faces").mkdir()
    verify = ["dfd-data", "verify", str(tmp_path / "faces")]  # not a dataset: exit status 1
    steps = [Step("check", "check", command=verify, outputs=[tmp_path / "faces"], partial_ok=True)]
    run_pipeline("test", steps, tmp_path, echo=lambda line: None)
    assert json.loads((tmp_path / "pipeline.json").read_text())["steps"][0]["status"] == "partial"
    lines: list[str] = []
    run_pipeline("test", steps, tmp_path, echo=lines.append)
    assert not any("already done" in line for line in lines)
    steps = [Step("check", "check", command=["dfd-data", "verify"], outputs=[tmp_path / "faces"], partial_ok=True)]
    with pytest.raises(PipelineError, match="step check failed \\(exit status 2\\)"):
        run_pipeline("test", steps, tmp_path, echo=lambda line: None)


def test_a_retried_step_that_changed_nothing_does_not_redo_the_later_ones(tmp_path):
    """A step that failed on some files is tried again on every run; where its dataset's
    manifest (its `state`) comes out as it was, the steps after it stay done."""
    state, log = tmp_path / "state.yaml", []

    def flaky(content: str):
        def work():
            state.write_text(content)
            raise UserError("one photo is broken")
        return work

    def steps(content: str) -> list[Step]:
        return [Step("data", "data", function=flaky(content), outputs=[state], partial_ok=True, state=state),
                Step("after", "after", function=_touch(tmp_path / "after.txt", log, "after"),
                     outputs=[tmp_path / "after.txt"])]

    for content, runs in (("a", ["after"]), ("a", ["after"]), ("b", ["after", "after"])):
        manifest = run_pipeline("test", steps(content), tmp_path, echo=lambda line: None)
        assert log == runs and manifest["steps"][0]["status"] == "partial"
    assert Step("s", "s", function=print, key="one").fingerprint() != Step("s", "s", function=print,
                                                                            key="two").fingerprint()


def test_a_failed_step_gives_its_exit_status_and_a_termination_signal_reaches_it(tmp_path, request):
    from pipelines.runner import _failure, _run_command

    steps = [Step("check", "check", command=["dfd-data", "verify"])]  # a usage error: exit status 2
    with pytest.raises(PipelineError, match="step check failed \\(exit status 2\\)") as caught:
        run_pipeline("test", steps, tmp_path, echo=lambda line: None)
    assert caught.value.exit_code == 2
    assert _failure(-9) == ("killed by SIGKILL (out of memory?)", 137)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    received = []  # (the pipeline's own handler here, so that a signal the step misses fails the test, not pytest)
    default = signal.signal(signal.SIGTERM, lambda number, _frame: received.append(number))
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, default))
    ours = signal.getsignal(signal.SIGTERM)

    def terminate() -> None:  # as `kill PIPELINE_PID` would, once the pipeline listens for it
        deadline = time.monotonic() + 60
        while signal.getsignal(signal.SIGTERM) is ours and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate, daemon=True).start()
    started = time.monotonic()
    assert _run_command(sleeper) == -signal.SIGTERM
    assert time.monotonic() - started < 30
    start = subprocess.Popen

    def start_late(argv):  # a SIGTERM that arrives as the step starts reaches it too
        os.kill(os.getpid(), signal.SIGTERM)
        return start(argv)

    with mock.patch.object(subprocess, "Popen", start_late):
        assert _run_command(sleeper) == -signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is ours and received == []

    def start_fails(argv):  # one that arrives as the step fails to start reaches the pipeline's handler
        os.kill(os.getpid(), signal.SIGTERM)
        raise FileNotFoundError(argv[0])

    with mock.patch.object(subprocess, "Popen", start_fails), pytest.raises(FileNotFoundError):
        _run_command(sleeper)
    assert signal.getsignal(signal.SIGTERM) is ours and received == [signal.SIGTERM]
    result = subprocess.run([sys.executable, "-m", "pipelines", "run", "folder", "--photos", str(tmp_path),
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and f"--out {tmp_path / 'run'} is inside --photos" in result.stderr


def _fake_celebamask(root: Path, photos: list[Path]) -> None:
    (root / "CelebA-HQ-img").mkdir(parents=True)
    poses = [(0.0, 3.0), (40.0, 0.0), (-5.0, -20.0), (12.0, -9.0)]
    males = ["-1", "1", "1", "1"]
    for index, photo in enumerate(photos):
        shutil.copy(photo, root / "CelebA-HQ-img" / f"{index}.jpg")
    (root / "CelebAMask-HQ-pose-anno.txt").write_text(
        f"{len(photos)}\nYaw Pitch Raw\n" + "".join(f"{i}.jpg {y} {p} 0.0\n" for i, (y, p) in enumerate(poses)))
    (root / "CelebAMask-HQ-attribute-anno.txt").write_text(
        f"{len(photos)}\nSmiling Male Young\n" + "".join(f"{i}.jpg 1 {m} -1\n" for i, m in enumerate(males)))


def test_celebamask_selection_keeps_frontal_faces_with_gender(shared_data, tmp_path):
    photos = sorted((shared_data / "celebahq").iterdir())[:4]
    root = tmp_path / "CelebAMask-HQ"
    _fake_celebamask(root, photos)
    assert select_celebamask(root, tmp_path / "out") == 2  # yaw 40 and pitch -20 are not frontal
    assert sorted(p.name for p in (tmp_path / "out" / "photos").iterdir()) == ["0.jpg", "3.jpg"]
    assert (tmp_path / "out" / "labels.csv").read_text().splitlines() == [
        "file,gender,split", "0.jpg,female,train", "3.jpg,male,train"]
    other = tmp_path / "other-copy"  # another copy, with other poses: the selection follows it
    _fake_celebamask(other, photos)
    (other / "CelebAMask-HQ-pose-anno.txt").write_text("4\nYaw Pitch Raw\n1.jpg 0 0 0\n2.jpg 0 0 0\n")
    assert select_celebamask(other, tmp_path / "out") == 2
    assert {p.name: p.resolve().parent for p in (tmp_path / "out" / "photos").iterdir()} == \
        {"1.jpg": (other / "CelebA-HQ-img").resolve(), "2.jpg": (other / "CelebA-HQ-img").resolve()}
    (root / "CelebAMask-HQ-pose-anno.txt").write_text("4\nYaw Pitch Raw\n0.jpg 1.0\n")
    with pytest.raises(RecipeError, match="line 3 has 1 values"):
        select_celebamask(root, tmp_path / "again")
    (root / "CelebAMask-HQ-pose-anno.txt").write_text("4\nYaw Pitch Raw\n0.jpg n/a 0 0\n")
    with pytest.raises(RecipeError, match="0.jpg: yaw 'n/a' or pitch '0' is not a number"):
        select_celebamask(root, tmp_path / "again")


def test_demo_recipe_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "demo-out"
    command = [sys.executable, "-m", "pipelines", "run", "demo", "--out", str(out), "--steps", "2"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"report {(out / 'report.html').resolve()}" in result.stdout
    manifest = json.loads((out / "pipeline.json").read_text())
    assert [s["name"] for s in manifest["steps"]] == [
        "photos", "align", "build-sketches", "crop-components", "train", "rough-sketches", "generate",
        "generate-rough", "generate-rough-raw", "report"]
    assert all(s["status"] == "done" for s in manifest["steps"])
    report = (out / "report.html").read_text()
    for image in ("generated/rough/grid.jpg", "report/losses.png", "faces/previews/align.jpg",
                  "faces/previews/sketches-photocopy+simplify.jpg", "run/grids/stage2-step0000002.jpg"):
        assert f'src="{image}"' in report and (out / image).is_file()
    faces = sorted(p.name for p in (out / "generated" / "rough").glob("*.png"))
    assert len(faces) >= 2 and faces == sorted(p.name for p in (out / "rough").glob("*.png"))

    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0 and "0 steps run, 10 skipped" in again.stdout


def test_an_option_the_recipe_does_not_take_is_refused(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("id,gender\n")
    result = subprocess.run([sys.executable, "-m", "pipelines", "run", "demo", "--out", str(tmp_path / "out"),
                             "--labels", str(labels), "--jobs", "7", "--batch-size", "2"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "the demo recipe does not take --labels, --jobs, --batch-size (it takes --photos)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_full_size_recipes_train_with_the_batch_asked_for(tmp_path):
    """The 512 model at the default batch of 8 runs out of memory on a 24 GB CPU machine:
    --batch-size must reach the training step of both full-size recipes."""
    from pipelines.full_size import celebamask_steps, full_size_steps

    for plan in (full_size_steps(tmp_path, tmp_path / "photos", batch_size=2),
                 celebamask_steps(tmp_path, tmp_path / "CelebAMask-HQ", batch_size=2)):
        train = next(step for step in plan if step.name == "train").command
        assert train[train.index("--batch-size") + 1] == "2"

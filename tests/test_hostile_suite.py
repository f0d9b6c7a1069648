"""One corpus of hostile and awkward files through every command (align, verify,
build-sketches, crop-components, generate, evaluate, the app's API); build-sketches killed at
random moments and resumed; a full disk and a folder that refuses writes; records that try to
lead a step out of the dataset.

Each check adds to the tally printed at the end of the session (tests/conftest.py): inputs
tried, crashes (a traceback, an exit status other than 0 or 1, an HTTP 5xx or no answer) and
files lost or corrupted (temporary files left, outputs failing verification, inputs changed).
"""
from __future__ import annotations

import base64
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from dfd_data.atomic import TEMP_PREFIX, sha256_file
from dfd_data.dataset import Dataset, jsonl_text, read_jsonl
from dfd_data.image_io import decode_image, read_image
from tests.conftest import REPO
from tests.hostile import (SPECIAL_FILES, TALLY, bad_files, bomb_png, fill_disk_after, good_variants, huge_jpeg,
                           palette_with_transparency, png, side_by_side, write_face_variants, write_folder)


@dataclass(frozen=True)
class Expect:
    """What each command must do with one corpus file."""

    align: str  # "aligned", "no_face" (skipped and reported), "failed" (reported), or "either" of the first two
    generate: str  # "face" or "refused" (one stderr line)
    app: int | None  # the HTTP status; None for what has no bytes to send (links, a FIFO)


PHOTO = Expect("aligned", "refused", 400)  # generate and the app want sketches
SKETCH = Expect("either", "face", 200)  # dlib sees a face in some sketches: aligned or skipped are both right
BROKEN = Expect("failed", "refused", 400)
SPECIAL = Expect("failed", "refused", None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_photos, sketched_dataset) -> tuple[Path, dict[str, bytes], dict[str, Expect]]:
    """The folder, the bytes of each plain file, and what each command must do with each entry."""
    astronaut = read_image(sample_photos / "astronaut.png")
    grace = read_image(sample_photos / "grace_hopper.jpg")
    sketch = read_image(sorted((sketched_dataset / "sketches" / "photocopy").glob("*.png"))[0])
    files: dict[str, bytes] = {}
    expect: dict[str, Expect] = {}

    def add(entries: dict[str, bytes], expectation: Expect) -> None:
        files.update(entries)
        expect.update(dict.fromkeys(entries, expectation))

    add(good_variants(astronaut), PHOTO)
    add({"grace hopper.jpg": (sample_photos / "grace_hopper.jpg").read_bytes(),
         "three faces.png": png(side_by_side(astronaut, grace, astronaut[:, ::-1])),
         "face cut by border.png": png(astronaut[:, 210:]),  # the face spans x 179..266: its left third is cut off
         "palette transparent.png": palette_with_transparency(astronaut)}, PHOTO)
    add({"huge 12000x9000.jpg": huge_jpeg(astronaut)}, Expect("aligned", "refused", 400))  # over the app's 16 MP
    add(good_variants(sketch, prefix="sketch "), SKETCH)
    add({"blank sketch.png": png(np.full((256, 256), 255, np.uint8))}, Expect("no_face", "face", 200))  # empty paper
    add({"black sketch.png": png(np.zeros((256, 256), np.uint8))}, Expect("no_face", "refused", 400))
    broken = bad_files(astronaut)
    add({"noise-no-face.png": broken.pop("noise-no-face.png")}, Expect("no_face", "refused", 400))
    add({"flat-no-face.jpg": broken.pop("flat-no-face.jpg")}, Expect("no_face", "face", 200))  # light gray: paper
    add(broken, BROKEN)
    folder = write_folder(tmp_path_factory.mktemp("corpus") / "in", files, symlink_loop=True, special=True)
    expect.update(dict.fromkeys(("loop.jpg", *SPECIAL_FILES), SPECIAL))
    return folder, files, expect


def run(module: str, *args, inputs: int = 0) -> subprocess.CompletedProcess:
    """`python -m module args`, as a user runs it; adds its inputs and any crash to the tally."""
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=REPO)
    TALLY.tried += inputs
    if result.returncode not in (0, 1) or "Traceback" in result.stderr:
        TALLY.crashes += 1
    return result


def invoke(*args, inputs: int = 0):
    """`dfd-data args` in this process (so that a test can break its writes); tallied like run()."""
    from click.testing import CliRunner

    from dfd_data.cli import main

    result = CliRunner().invoke(main, [*map(str, args)])
    TALLY.tried += inputs
    if result.exit_code not in (0, 1) or not isinstance(result.exception, (SystemExit, type(None))):
        TALLY.crashes += 1
    return result


def one_error_line(output: str) -> str:
    """The command's last line, which must be its one-line error, with no traceback before it."""
    assert "Traceback" not in output, output
    return output.strip().splitlines()[-1]


def leftovers(folder: Path) -> list[str]:
    """Temporary files a write left behind (links to folders are not followed)."""
    return [os.path.join(d, name) for d, _dirs, names in os.walk(folder) for name in names if name.startswith(TEMP_PREFIX)]


def damage(root: Path, tolerated: frozenset[str] = frozenset()) -> list[str]:
    """What `verify` finds wrong in a dataset, and temporary files, beyond the harm a test did
    on purpose (`tolerated`, as verify words it); each one adds to the tally."""
    report = Dataset(root).verify()
    found = {f"{kind}: {relpath}" for kind in ("missing", "altered", "added") for relpath in getattr(report, kind)}
    found |= {f"temporary: {path}" for path in leftovers(root)}
    found -= tolerated
    TALLY.lost_or_corrupted += len(found)
    return sorted(found)


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def differences(root: Path, reference: Path) -> list[str]:
    """Files that differ from the reference run's (or exist in only one); each adds to the tally."""
    mine, theirs = all_files(root), all_files(reference)
    different = sorted(name for name in mine.keys() | theirs.keys() if mine.get(name) != theirs.get(name))
    TALLY.lost_or_corrupted += len(different)
    return different


def recorded_outputs_whole(folder: Path, root: Path | None = None) -> bool:
    """Every output that folder/records.jsonl names is on disk, under root (default: the
    dataset two levels up), with its recorded digest. (A file written but not yet recorded
    when the run stopped is not trusted: the rerun redoes it.)"""
    root = folder.parent.parent if root is None else root
    outputs = {name: digest for record in read_jsonl(folder / "records.jsonl")
               for name, digest in record.get("outputs", {}).items()}
    broken = [name for name, digest in outputs.items() if not (root / name).is_file() or sha256_file(root / name) != digest]
    TALLY.lost_or_corrupted += len(broken)
    return not broken


# ---- align over the corpus ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def aligned(corpus) -> tuple[Path, subprocess.CompletedProcess]:
    folder, _files, expect = corpus
    dst = folder.parent / "faces"
    return dst, run("dfd_data", "align", folder, dst, "--size", "128", "--jobs", "2", "--quiet", inputs=len(expect))


def test_align_reports_every_bad_file_and_aligns_every_photo(corpus, aligned):
    folder, _files, expect = corpus
    dst, result = aligned
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    reports = {Path(row["file"]).name: row for row in read_jsonl(dst / "errors.jsonl")}
    statuses = {record["source"]: record["status"] for record in Dataset(dst).records()}
    wrong = []
    for name, want in expect.items():
        status, report = statuses.get(name), reports.get(name)
        allowed = {"either": ("aligned", "no_face"), "failed": ("error",)}.get(want.align, (want.align,))
        if status == "aligned":
            ok = report is None
        else:
            ok = (report is not None and report["status"] == ("skipped" if status == "no_face" else "failed")
                  and report["reason"].startswith(f"{folder / name}: ") and "\n" not in report["reason"])
        if status not in allowed or not ok:
            wrong.append((name, status, report))
    assert not wrong
    assert set(reports) <= set(expect)  # the link back to the folder is walked once and is no error
    assert damage(dst) == []
    faces = Dataset(dst).aligned()
    assert len(faces) >= 15 and all(read_image(dst / r["image"]).shape == (128, 128, 3) for r in faces)


# ---- verify, build-sketches and crop-components over damaged images -------------------------
HARMS = ("truncated", "empty", "html", "bomb", "deleted", "loop")


@pytest.fixture(scope="module")
def damaged(aligned, tmp_path_factory) -> tuple[Path, dict[str, str], frozenset[str]]:
    """A copy of the aligned corpus with six images harmed and one file added; also what
    `verify` must say about them."""
    root = tmp_path_factory.mktemp("damaged") / "faces"
    shutil.copytree(aligned[0], root, symlinks=True)
    victims = dict(zip([r["id"] for r in Dataset(root).aligned()], HARMS))
    for record_id, harm in victims.items():
        path = root / "images" / f"{record_id}.png"
        data = path.read_bytes()
        path.unlink()
        if harm == "loop":
            os.symlink(path.name, path)
        elif harm != "deleted":
            path.write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "bomb": bomb_png(),
                              "html": b"<!DOCTYPE html><html><body>not a face</body></html>\n"}[harm])
    (root / "images" / "intruder.png").write_bytes(png(np.zeros((128, 128), np.uint8)))
    said = frozenset({f"{'missing' if harm in ('deleted', 'loop') else 'altered'}: images/{record_id}.png"
                      for record_id, harm in victims.items()} | {"added: images/intruder.png"})
    return root, victims, said


def test_verify_names_every_harmed_file(damaged):
    root, victims, said = damaged
    result = run("dfd_data", "verify", root, inputs=len(victims) + 1)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stdout.strip().splitlines()
    assert set(lines[:-1]) == said and len(lines) - 1 == len(said)


def test_sketches_and_crops_fail_each_harmed_image_alone(damaged):
    root, victims, said = damaged
    sketched = run("dfd_data", "build-sketches", root, "--method", "photocopy", "--jobs", "2", "--quiet",
                   inputs=len(victims))
    cropped = run("dfd_data", "crop-components", root, "--jobs", "2", "--quiet", inputs=2 * len(victims))
    for result in (sketched, cropped):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    harmed = {str(root / "images" / f"{i}.png") for i in victims}
    unsketched = {str(root / "sketches" / "photocopy" / f"{i}.png") for i in victims}
    rows = read_jsonl(root / "errors.jsonl")
    for step, files in [("build-sketches:photocopy", harmed), ("crop-components:images", harmed),
                        ("crop-components:sketches/photocopy", unsketched)]:
        reported = [row for row in rows if row["step"] == step]
        assert {row["file"] for row in reported} == files and len(reported) == len(files), step
        assert all(row["reason"].startswith(row["file"] + ": ") and "\n" not in row["reason"] for row in reported)
    healthy = sorted(r["id"] for r in Dataset(root).aligned() if r["id"] not in victims)
    assert sorted(p.stem for p in (root / "sketches" / "photocopy").glob("*.png")) == healthy
    for source in ("images", "sketches/photocopy"):
        assert (root / "components" / source / "ids.txt").read_text().split() == healthy
        assert np.load(root / "components" / source / "nose.npy").shape[0] == len(healthy)
    assert damage(root, tolerated=said) == []  # the harm done on purpose, nothing more


# ---- generate, evaluate and the app over the corpus -----------------------------------------
def test_generate_names_every_refused_file_and_draws_every_sketch(corpus, tiny_model_folder, tmp_path):
    folder, _files, expect = corpus
    out = tmp_path / "faces"
    result = run("dfd_model", "generate", "--model", tiny_model_folder, folder, "-o", out, "--device", "cpu",
                 "--batch-size", "8", "--quiet", inputs=len(expect))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    refused = [name for name, want in expect.items() if want.generate == "refused"]
    named = {name: sum(line.startswith(f"{folder / name}: ") for line in lines) for name in expect}
    assert {name for name, count in named.items() if count} == set(refused)
    assert len(lines) == len(refused) and all(named[name] == 1 for name in refused)
    expected, seen = set(), {}
    for stem in (Path(name).stem for name in sorted(expect) if expect[name].generate == "face"):
        seen[stem] = seen.get(stem, 0) + 1  # equal stems get -2, -3 (sketch photo.bmp, .tiff, .webp)
        expected.add(f"{stem}.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}.png")
    assert {p.name for p in out.iterdir()} == expected
    unreadable = [p for p in out.iterdir() if read_image(p).shape != (128, 128, 3)]
    TALLY.lost_or_corrupted += len(unreadable) + len(leftovers(out))
    assert not unreadable and not leftovers(out)


def test_evaluate_names_every_unreadable_pair_and_scores_the_rest(corpus, tiny_model_folder, sketched_dataset,
                                                                  tmp_path):
    """Every corpus file as the sketch of a pair (with a good photo), plus a good sketch whose
    photo is truncated: each unreadable file is one stderr line, the rest are scored."""
    folder, files, expect = corpus
    photo = sorted((sketched_dataset / "images").glob("*.png"))[0].read_bytes()
    renamed = {name: f"{Path(name).stem} ({Path(name).suffix[1:]}){Path(name).suffix}" for name in files}
    pairs = tmp_path / "pairs"
    write_folder(pairs / "sketches", {renamed[name]: data for name, data in files.items()}, symlink_loop=True,
                 special=True)
    (pairs / "sketches" / "good sketch, bad photo.png").write_bytes(files["sketch gray.png"])
    stems = [Path(name).stem for name in [*renamed.values(), "loop.jpg", *SPECIAL_FILES]]
    write_folder(pairs / "photos", {f"{stem}.png": photo for stem in stems})
    (pairs / "photos" / "good sketch, bad photo.jpg").write_bytes(files["truncated.jpg"])
    out = tmp_path / "evaluation"
    result = run("dfd_model", "evaluate", "--model", tiny_model_folder, "--pairs", pairs, "--out", out, "--device",
                 "cpu", "--batch-size", "8", "--quiet", inputs=len(expect) + 1)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    unreadable = [pairs / "sketches" / renamed.get(name, name) for name, want in expect.items()
                  if want.generate == "refused"] + [pairs / "photos" / "good sketch, bad photo.jpg"]
    lines = [line for line in result.stderr.splitlines() if line.startswith(str(pairs))]  # not scipy's warnings
    assert "--from-photo" not in result.stderr  # generate's advice: evaluate has no such option
    assert "a pair's sketch must be a drawing, not a photo" in result.stderr
    assert len(lines) == len(unreadable) and all(sum(line.startswith(f"{path}: ") for line in lines) == 1
                                                 for path in unreadable)
    metrics = json.loads((out / "metrics.json").read_text())
    scored = sum(want.generate == "face" for want in expect.values())
    assert metrics["counts"]["pairs"] == scored and metrics["counts"]["unreadable"] == len(unreadable)
    assert len(list((out / "faces").iterdir())) == scored and not leftovers(out)


def _post(url: str, sketch: bytes) -> tuple[int | None, dict]:
    body = json.dumps({"sketch": base64.b64encode(sketch).decode("ascii")}).encode()
    request = urllib.request.Request(url + "/api/generate", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except (OSError, ValueError):  # no answer at all: reset, timeout, not JSON
        return None, {}


def test_the_app_answers_every_corpus_file_and_keeps_serving(corpus, tiny_model_folder, one_torch_thread):
    from dfd_model.serve import make_server
    from dfd_model.sketch_to_face import SketchToFace

    _folder, files, expect = corpus
    server = make_server(SketchToFace.from_pretrained(tiny_model_folder, device="cpu"), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        wrong = []
        for name, want in expect.items():
            if want.app is None:
                continue
            status, answer = _post(url, files[name])
            TALLY.tried += 1
            TALLY.crashes += status is None or status >= 500
            if status == 200:
                ok = decode_image(base64.b64decode(answer["face"].split(",", 1)[1])).shape == (128, 128, 3)
            else:
                ok = "sketch" in answer.get("error", "") and "\n" not in answer["error"]
            if status != want.app or not ok:
                wrong.append((name, status, answer.get("error")))
        assert not wrong
        assert _post(url, files["sketch gray.png"])[0] == 200  # still serving
    finally:
        server.shutdown()
        server.server_close()


def test_the_app_listens_only_on_this_machine_unless_told():
    import inspect

    from dfd_model.cli import main
    from dfd_model.serve import make_server

    assert inspect.signature(make_server).parameters["host"].default == "127.0.0.1"
    assert next(p for p in main.commands["serve"].params if p.name == "host").default == "127.0.0.1"


def test_no_command_changed_the_corpus(corpus):
    """Runs last in this module: every input is still there, byte for byte."""
    folder, files, _expect = corpus
    changed = [name for name, data in files.items() if not (folder / name).is_file() or (folder / name).read_bytes() != data]
    TALLY.lost_or_corrupted += len(changed)
    assert not changed


# ---- interruption: SIGKILL and resume ---------------------------------------------------------
SKETCH_ARGS = ("--method", "photocopy", "--jobs", "1", "--quiet")


@pytest.fixture(scope="module")
def faces24(tmp_path_factory, sample_photos) -> Path:
    """24 aligned 128 px faces: the two sample photos turned, scaled, mirrored and brightened."""
    photos = tmp_path_factory.mktemp("faces24") / "photos"
    write_face_variants(sample_photos, photos, 12)
    root = photos.parent / "faces"
    result = run("dfd_data", "align", photos, root, "--size", "128", "--jobs", "2", "--quiet")
    assert result.returncode == 0 and len(Dataset(root).aligned()) == 24, result.stdout + result.stderr
    return root


@pytest.fixture(scope="module")
def sketched24(faces24, tmp_path_factory) -> Path:
    """faces24 after one uninterrupted build-sketches: what every interrupted run must end as."""
    root = tmp_path_factory.mktemp("sketched24") / "faces"
    shutil.copytree(faces24, root)
    assert run("dfd_data", "build-sketches", root, *SKETCH_ARGS).returncode == 0
    return root


def kill_after_records(root: Path, after: int, delay: float) -> None:
    """Start build-sketches and SIGKILL it `delay` seconds after `after` sketches are recorded
    (0: as it starts), so that it dies anywhere in a sketch's work, its write included."""
    process = subprocess.Popen([sys.executable, "-m", "dfd_data", "build-sketches", str(root), *SKETCH_ARGS],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = root / "sketches" / "photocopy" / "records.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if records.exists() and records.read_bytes().count(b"\n") >= after:
            break
        time.sleep(0.002)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "build-sketches finished before it could be killed"


@pytest.mark.parametrize("seed", [1, 2, 5])  # seeds that kill early, late and midway through the 24 faces
def test_build_sketches_killed_at_a_random_moment_resumes_to_identical_files(faces24, sketched24, tmp_path, seed):
    root = tmp_path / "faces"
    shutil.copytree(faces24, root)
    rng = random.Random(seed)
    kill_after_records(root, rng.randint(0, 14), rng.uniform(0.0, 0.01))
    assert recorded_outputs_whole(root / "sketches" / "photocopy")  # a temporary file may be left: not trusted
    resumed = run("dfd_data", "build-sketches", root, *SKETCH_ARGS, inputs=1)
    assert resumed.returncode == 0, resumed.stderr
    assert differences(root, sketched24) == []


# ---- a full disk, a folder that refuses writes --------------------------------------------------
def test_a_disk_that_fills_up_gives_one_line_keeps_every_file_whole_and_resumes(faces24, sketched24, tmp_path,
                                                                                 monkeypatch):
    """Every fsync after the fifth fails with ENOSPC, as writes do on a full disk."""
    root = tmp_path / "faces"
    shutil.copytree(faces24, root)
    fill_disk_after(monkeypatch, 5)
    full = invoke("build-sketches", root, *SKETCH_ARGS, "--backend", "threading", inputs=1)
    monkeypatch.undo()
    assert full.exit_code == 1
    line = one_error_line(full.output)
    assert line.startswith(f"Error: {root}") and line.endswith(": cannot write (No space left on device)"), line
    assert not leftovers(root) and recorded_outputs_whole(root / "sketches" / "photocopy")
    assert 0 < len(list((root / "sketches" / "photocopy").glob("*.png"))) < 24
    again = invoke("build-sketches", root, *SKETCH_ARGS, "--backend", "threading")
    assert again.exit_code == 0, again.output
    assert differences(root, sketched24) == []


def test_align_on_a_disk_that_fills_up_gives_one_line_keeps_every_file_whole_and_resumes(faces24, tmp_path,
                                                                                        monkeypatch):
    """The same for align: every fsync after the seventh fails with ENOSPC."""
    photos, root = faces24.parent / "photos", tmp_path / "faces"
    args = ("align", photos, root, "--size", "128", "--jobs", "2", "--backend", "threading", "--quiet")
    fill_disk_after(monkeypatch, 7)
    full = invoke(*args, inputs=24)
    monkeypatch.undo()
    assert full.exit_code == 1
    line = one_error_line(full.output)
    assert line.startswith(f"Error: {root}") and line.endswith(": cannot write (No space left on device)"), line
    assert not leftovers(root) and recorded_outputs_whole(root, root)
    assert 0 < len(list((root / "images").glob("*.png"))) < 24
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert differences(root, faces24) == []


def test_a_folder_that_refuses_writes_fails_its_files_with_the_reason_and_resumes(sketched24, tmp_path,
                                                                                  monkeypatch):
    """components/sketches/ cannot be written to (patched: chmod does not stop root)."""
    reference, root = tmp_path / "reference", tmp_path / "faces"
    shutil.copytree(sketched24, reference)
    shutil.copytree(sketched24, root)
    assert invoke("crop-components", reference, "--jobs", "1", "--backend", "threading", "--quiet").exit_code == 0
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's name
        if dir is not None and Path(dir).is_relative_to(root / "components" / "sketches"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    refused = invoke("crop-components", root, "--jobs", "1", "--backend", "threading", "--quiet", inputs=1)
    monkeypatch.undo()
    assert refused.exit_code == 1
    line = one_error_line(refused.output)
    assert line == f"Error: {root}/components/sketches/photocopy/records.jsonl: cannot write (Permission denied)"
    assert not leftovers(root) and not list((root / "components" / "sketches").rglob("*.png"))
    assert damage(root) == []  # what was written is whole and recorded
    again = invoke("crop-components", root, "--jobs", "1", "--backend", "threading", "--quiet")
    assert again.exit_code == 0, again.output
    assert differences(root, reference) == []


def _mount_small_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_really_full_tmpfs(faces24, sketched24, tmp_path):
    """The same on a real file system that runs out of space (where this test may mount one)."""
    pages = sum(-(-p.stat().st_size // 4096) for p in faces24.rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    if not _mount_small_tmpfs(disk, (pages + 16) * 4096):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        root = disk / "faces"
        shutil.copytree(faces24, root)
        full = run("dfd_data", "build-sketches", root, *SKETCH_ARGS, inputs=1)
        assert full.returncode == 1
        assert one_error_line(full.stderr).endswith("(No space left on device)"), full.stderr
        assert not leftovers(root) and recorded_outputs_whole(root / "sketches" / "photocopy")
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        again = run("dfd_data", "build-sketches", root, *SKETCH_ARGS)
        assert again.returncode == 0, again.stderr
        assert differences(root, sketched24) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ---- records that point outside the dataset -----------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("id", "../../escaped", "is not a plain file name"),
    ("id", "/tmp/escaped", "is not a plain file name"),
    ("image", "../outside.png", "escapes the dataset folder"),
    ("image", "/etc/hostname", "escapes the dataset folder"),
])
def test_records_cannot_lead_a_step_out_of_the_dataset(dataset_copy, field, value, message):
    root = dataset_copy
    (root.parent / "outside.png").write_bytes(png(np.full((128, 128), 200, np.uint8)))
    rows = read_jsonl(root / "records.jsonl")
    rows[0][field] = value
    (root / "records.jsonl").write_text(jsonl_text(rows))
    before = sorted(root.parent.rglob("*"))
    for command in (["build-sketches", root, "--method", "canny"], ["crop-components", root]):
        result = invoke(*command, "--jobs", "1", "--backend", "threading", "--quiet", inputs=1)
        assert result.exit_code == 1 and message in one_error_line(result.output), result.output
    assert sorted(root.parent.rglob("*")) == before  # nothing written, inside or out


def test_a_manifest_cannot_send_verify_out_of_the_dataset(dataset_copy):
    import yaml

    manifest = yaml.safe_load((dataset_copy / "data_manifest.yaml").read_text())
    manifest["steps"]["align"]["files"]["../../../etc/passwd"] = "0" * 64
    (dataset_copy / "data_manifest.yaml").write_text(yaml.safe_dump(manifest))
    result = run("dfd_data", "verify", dataset_copy, inputs=1)
    assert result.returncode == 1 and "escapes the dataset folder" in one_error_line(result.stderr)

"""Sketch filters, method resolution and `dfd-data build-sketches` on a small dataset."""
from __future__ import annotations

import os
import numpy as np
import pytest
import torch

from dfd_data.dataset import Dataset, read_jsonl
from dfd_data.image_io import read_image
from dfd_data.sketch_filters import canny, levels, pencil, photocopy
from dfd_data.sketch_methods import MethodError, resolve_method
from tests.conftest import dfd_data


@pytest.fixture(scope="module")
def face(sample_dataset):
    return read_image(sample_dataset / "images" / "astronaut.png")


def ink(sketch: np.ndarray) -> float:
    return float((sketch < 128).mean())


def test_filters_give_mostly_paper_with_some_lines(face):
    for sketch in (canny(face), pencil(face), photocopy(face)):
        assert sketch.dtype == np.uint8 and sketch.shape == face.shape[:2]
        assert 0.003 < ink(sketch) < 0.3


def test_filters_leave_a_flat_photo_blank():
    flat = np.full((96, 96, 3), 180, np.uint8)
    for sketch in (canny(flat), pencil(flat), photocopy(flat)):
        assert ink(sketch) == 0.0


def test_photocopy_parameters_do_what_they_say(face):
    assert (photocopy(face, pct_black=0.5) == 0).mean() > (photocopy(face, pct_black=0.05) == 0).mean()
    assert (photocopy(face, pct_white=0.6) == 255).mean() > (photocopy(face, pct_white=0.05) == 255).mean()
    assert np.array_equal(photocopy(face), photocopy(face))


def test_photocopy_prints_black_areas_as_toner_like_gimp():
    half = np.full((64, 64, 3), 200, np.uint8)
    half[:, :32] = 0
    sketch = photocopy(half)
    assert (sketch[:, :20] == 0).all() and (sketch[:, 44:] >= 250).all()


def test_canny_lines_are_pure_ink_on_paper(face):
    assert set(np.unique(canny(face))) <= {0, 255}


def test_filters_refuse_gray_input():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        photocopy(np.zeros((8, 8), np.uint8))


def test_levels_turn_grey_lines_to_ink_and_light_grey_to_paper():
    ramp = np.arange(256, dtype=np.uint8)[None, :]
    out = levels(ramp, 192, 250)[0]
    assert (out[:193] == 0).all() and (out[250:] == 255).all()
    assert 0 < out[221] < 255 and (np.diff(out.astype(int)) >= 0).all()
    assert np.array_equal(levels(ramp, 0, 255), ramp)
    with pytest.raises(ValueError, match="ink < paper"):
        levels(ramp, 200, 200)


def test_method_ids_name_the_parameters():
    assert resolve_method("photocopy").id == "photocopy"
    tuned = resolve_method("photocopy", {"mask_radius": "6"})
    assert tuned.params["photocopy"]["mask_radius"] == 6.0
    assert tuned.id.startswith("photocopy-") and tuned.id == resolve_method("photocopy", {"mask_radius": 6.0}).id
    assert resolve_method("canny", {"equalize": "false"}).params["canny"]["equalize"] is False
    assert resolve_method("photocopy", {"pct_black": "-0"}).id == resolve_method("photocopy", {"pct_black": 0}).id


def test_simplifier_weights_are_named_by_their_absolute_path(tmp_path, monkeypatch):
    """However the path is spelled, one file is one method id, and workers in other folders
    (a dask cluster) find it."""
    from dfd_data.simplifier import default_simplifier_path

    (tmp_path / "w.safetensors").write_bytes(default_simplifier_path().read_bytes())
    monkeypatch.chdir(tmp_path)
    methods = [resolve_method("photocopy+simplify", {"weights": spelled})
               for spelled in ("w.safetensors", "./w.safetensors", str(tmp_path / "w.safetensors"))]
    assert {m.params["simplify"]["weights"] for m in methods} == {str((tmp_path / "w.safetensors").resolve())}
    assert len({m.id for m in methods}) == 1


@pytest.mark.parametrize("name, overrides, message", [
    ("sketchify", {}, "unknown sketch method 'sketchify'"),
    ("canny", {"mask_radius": 3}, "parameter 'mask_radius' does not apply to method canny"),
    ("canny", {"low": "many"}, "parameter low='many' is not a valid int"),
    ("photocopy+simplify", {"weights": "/nowhere.safetensors"}, "/nowhere.safetensors: simplifier weights file not found"),
    ("photocopy", {"pct_black": 2}, "parameter pct_black=2.0 is outside 0.0..1.0"),
    ("hed", {"low": 0.6}, "parameter low=0.6 is above high=0.5"),
    ("photocopy+simplify", {"ink": 250}, "parameter ink=250 is not below paper=250"),
])
def test_bad_methods_are_one_line_errors(name, overrides, message):
    with pytest.raises(MethodError, match=message.replace("+", r"\+").replace(".", r"\.")):
        resolve_method(name, overrides)


def test_build_sketches_writes_records_preview_and_resumes(dataset_copy):
    result = dfd_data("build-sketches", dataset_copy, "--method", "photocopy", "--jobs", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("build-sketches:photocopy: 2 done, 0 skipped, 0 failed")
    for record in Dataset(dataset_copy).aligned():
        sketch = read_image(dataset_copy / f"sketches/photocopy/{record['id']}.png")
        assert sketch.shape == (128, 128, 3) and np.array_equal(sketch[:, :, 0], sketch[:, :, 2])  # stored gray
    step = Dataset(dataset_copy).load_manifest()["steps"]["build-sketches:photocopy"]
    assert step["params"]["params"]["photocopy"]["mask_radius"] == 10.0 and step["counts"]["sketched"] == 2
    assert read_image(dataset_copy / "previews/sketches-photocopy.jpg").shape == (256, 4 * 256, 3)
    again = dfd_data("build-sketches", dataset_copy, "--method", "photocopy", "--quiet")
    assert again.stdout.startswith("build-sketches:photocopy: 0 done, 2 skipped (2 already done), 0 failed")
    assert dfd_data("crop-components", dataset_copy, "--quiet").returncode == 0
    assert np.load(dataset_copy / "components/sketches/photocopy/left_eye.npy").shape == (2, 32, 32)
    assert dfd_data("verify", dataset_copy).returncode == 0


def test_a_broken_aligned_image_fails_alone(dataset_copy):
    (dataset_copy / "images/grace_hopper.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = dfd_data("build-sketches", dataset_copy, "--method", "canny", "--quiet")
    assert result.returncode == 1
    assert result.stdout.startswith("build-sketches:canny: 1 done, 0 skipped, 1 failed")
    errors = [row for row in read_jsonl(dataset_copy / "errors.jsonl") if row["step"] == "build-sketches:canny"]
    assert len(errors) == 1 and errors[0]["file"].endswith("grace_hopper.png")
    assert not (dataset_copy / "sketches/canny/grace_hopper.png").exists()


def test_changed_recipe_redoes_the_sketches(dataset_copy):
    """Outputs made with other parameters or weights (same folder id) are not kept."""
    import json

    assert dfd_data("build-sketches", dataset_copy, "--method", "canny", "--quiet").returncode == 0
    records = dataset_copy / "sketches/canny/records.jsonl"
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    records.write_text("".join(json.dumps({**row, "recipe": "made-by-an-older-version"}) + "\n" for row in rows))
    again = dfd_data("build-sketches", dataset_copy, "--method", "canny", "--quiet")
    assert again.stdout.startswith("build-sketches:canny: 2 done, 0 skipped, 0 failed")


def test_thinning_and_photocopy_run_on_the_process_s_threads_in_order_and_alone_in_a_one_thread_worker(monkeypatch):
    import threading

    from dfd_data.sketch_methods import _thread_map

    def work(item):
        seen.add(threading.get_ident())
        return item * 2

    for threads, pool in (("1", False), ("2", True)):  # (a worker process's share: OMP_NUM_THREADS)
        seen = set()
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        assert _thread_map(work, list(range(20))) == [2 * i for i in range(20)]
        assert (threading.get_ident() not in seen) == pool


def test_a_filter_method_runs_without_importing_torch(sample_dataset, tmp_path):
    """A filter method needs OpenCV and NumPy only: importing torch took 2 s of the command's
    start (its up-front weights check) and of every loky worker's (the thread count)."""
    import subprocess
    import sys

    script = tmp_path / "sketch.py"
    script.write_text("import sys\n"
                      "import dfd_data.build_sketches\n"
                      "from dfd_data.image_io import read_image\n"
                      "from dfd_data.sketch_methods import load_networks, resolve_method, run_method\n"
                      "method = resolve_method('photocopy')\n"
                      "assert load_networks(method) is None\n"
                      f"face = read_image({str(sample_dataset / 'images' / 'astronaut.png')!r})\n"
                      "assert len(run_method(method, [face, face])) == 2\n"
                      "print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env={
        **os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_network_loaded_under_auto_is_the_one_workers_get_under_its_resolved_settings():
    """build-sketches loads the networks under "auto" (to fail early) and hands the workers
    the precision it resolved to: both must be the same model in memory, not two copies."""
    from dfd_data import sketch_methods
    from dfd_data.devices import precision_name, resolve_precision
    from dfd_data.simplifier import default_simplifier_path

    resolved = precision_name(resolve_precision("auto", torch.device("cpu")))
    assert sketch_methods.load_networks(resolve_method("photocopy+simplify"), "cpu", "auto") == resolved
    weights = str(default_simplifier_path())
    assert sketch_methods._simplifier_model(weights, "cpu", resolved) is \
        sketch_methods._simplifier_model(weights, "cpu", "auto")

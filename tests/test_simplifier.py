"""Sketch simplifier: the released architecture and its weight layout, safe loading, the
safetensors round trip, inference on odd sizes, the synthetic pair generator, a short
training run, and the line F-score. Tiny widths keep it fast on a 2-core CPU."""
from __future__ import annotations

import json
import os
import pickle

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from dfd_data import simplifier as simplifier_module
from dfd_data.errors import ModelMissingError
from dfd_data.line_metrics import distance_to_ink, line_f_score, line_scores
from dfd_data.rough_sketches import RoughSketchGenerator, degrade, procedural_clean_lines
from dfd_data.simplifier import (GAN_MEAN, GAN_STD, RELEASED_STATISTICS, Simplifier, SimplifierWeightsError, default_simplifier_path,
                                 load_released, load_simplifier, read_simplifier_metadata, save_simplifier,
                                 scaled_channels, simplify)
from dfd_data.train_simplifier import (PairSource, TrainingError, evaluate_denoising, loss_weights,
                                       make_eval_pairs, train_simplifier)
from dfd_data.winograd import WinogradConv3x3

RELEASED_KEYS = [f"{index}.{kind}" for index in range(0, 45, 2) for kind in ("weight", "bias")]


@pytest.fixture(scope="module")
def full_width() -> Simplifier:
    torch.manual_seed(0)
    return Simplifier(1.0)


@pytest.fixture(scope="module")
def tiny() -> Simplifier:
    torch.manual_seed(0)
    return Simplifier(0.0625).eval()


def _fake_released_state(model: Simplifier) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {key: torch.randn(value.shape, generator=generator) * 0.01 for key, value in model.state_dict().items()}


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------- architecture


def test_full_width_is_the_released_architecture(full_width):
    assert abs(sum(p.numel() for p in full_width.parameters()) - 44.4e6) <= 0.1e6
    assert list(full_width.state_dict()) == RELEASED_KEYS
    shapes = {key: tuple(value.shape) for key, value in full_width.state_dict().items()}
    assert shapes["0.weight"] == (48, 1, 5, 5)
    assert shapes["16.weight"] == (1024, 512, 3, 3)
    assert shapes["28.weight"] == (256, 256, 4, 4)  # transposed conv: [in, out, kh, kw]
    assert shapes["44.weight"] == (1, 24, 3, 3)
    assert [i for i, m in enumerate(full_width) if isinstance(m, nn.ConvTranspose2d)] == [28, 34, 40]
    assert [full_width[i].stride[0] for i in (0, 6, 12)] == [2, 2, 2]
    assert isinstance(full_width[45], nn.Sigmoid)
    assert all(isinstance(full_width[i], nn.ReLU) for i in range(1, 44, 2))
    assert (full_width.mean, full_width.std) == (GAN_MEAN, GAN_STD)


def test_width_scales_channels_to_multiples_of_eight():
    assert scaled_channels(1024, 0.25) == 256 and scaled_channels(24, 0.25) == 8 and scaled_channels(48, 0.1) == 8
    model = Simplifier(0.25)
    assert model.channels[-1] == 1
    assert all(c % 8 == 0 and c >= 8 for c in model.channels[:-1])
    assert sum(p.numel() for p in model.parameters()) < 3.0e6


def test_output_keeps_odd_input_sizes(tiny):
    for height, width in ((101, 77), (8, 8), (33, 250)):
        with torch.inference_mode():
            out = tiny(torch.rand(2, 1, height, width))
        assert out.shape == (2, 1, height, width)
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


# ---------------------------------------------------------------------------- released weights


def loaded_parameter(model: Simplifier, key: str) -> torch.Tensor:
    """A released parameter as the loaded model holds it; a layer the inference rewrite runs
    by Winograd's algorithm gives back the weights its transformed ones stand for."""
    index, kind = key.split(".")
    layer = model[int(index)]
    if isinstance(layer, WinogradConv3x3):
        layer = layer.as_layers()[0]
    return getattr(layer, kind)


def test_load_released_accepts_the_layouts_in_use(tmp_path, full_width):
    state = _fake_released_state(full_width)
    bare = tmp_path / "model_gan.pth"
    torch.save(state, bare)
    model = load_released(bare, "cpu", precision="fp32")  # bf16 would cast the weights
    assert model.width == 1.0 and (model.mean, model.std) == (GAN_MEAN, GAN_STD)
    for key in RELEASED_KEYS:
        torch.testing.assert_close(loaded_parameter(model, key), state[key], rtol=1e-6, atol=1e-6)
    with torch.inference_mode():
        assert model(torch.rand(1, 1, 24, 40)).shape == (1, 1, 24, 40)

    # the other released models differ only in their input statistics, told by the file's name
    for name in ("model_mse.pth", "model_pencil1.pth", "model_pencil2.pth"):
        torch.save(state, tmp_path / name)
        model = load_released(tmp_path / name, "cpu", precision="fp32")
        assert (model.mean, model.std) == RELEASED_STATISTICS[name[6:-4]]
    torch.save(state, tmp_path / "simplifier.pth")
    with pytest.raises(SimplifierWeightsError, match="holds no input mean/std and its name does not say"):
        load_released(tmp_path / "simplifier.pth", "cpu")

    # a .t7 conversion keeping its statistics next to a prefixed state dict
    wrapped = tmp_path / "converted_t7.pt"
    torch.save({"state_dict": {f"layers.{k}": v for k, v in state.items()}, "mean": 0.98, "std": 0.09}, wrapped)
    model = load_released(wrapped, "cpu", precision="fp32")
    assert (model.mean, model.std) == (0.98, 0.09)
    assert torch.equal(model.state_dict()["44.weight"], state["44.weight"])


def test_load_released_refuses_wrong_layout_in_one_line(tmp_path):
    wrong_shapes = tmp_path / "wrong_shapes.pth"
    torch.save({key: torch.zeros(3) for key in RELEASED_KEYS}, wrong_shapes)
    with pytest.raises(SimplifierWeightsError) as error:
        load_released(wrong_shapes, "cpu")
    assert str(wrong_shapes) in _one_line(error) and "0.weight" in str(error.value)

    wrong_keys = tmp_path / "hed.pth"
    torch.save({"netVggOne.0.weight": torch.zeros(64, 3, 3, 3)}, wrong_keys)
    with pytest.raises(SimplifierWeightsError) as error:
        load_released(wrong_keys, "cpu")
    assert str(wrong_keys) in _one_line(error) and "missing" in str(error.value)

    garbage = tmp_path / "notes.pth"
    garbage.write_bytes(b"these are not weights\n" * 10)
    with pytest.raises(SimplifierWeightsError) as error:
        load_released(garbage, "cpu")
    assert str(garbage) in _one_line(error)

    with pytest.raises(ModelMissingError) as error:
        load_released(tmp_path / "absent.pth", "cpu")
    assert "absent.pth" in _one_line(error)


class _Exploit:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_load_released_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    plain = tmp_path / "plain_pickle.pth"
    plain.write_bytes(pickle.dumps({"0.weight": _Exploit(marker)}, protocol=2))
    zipped = tmp_path / "torch_zip.pth"
    torch.save({"0.weight": _Exploit(marker)}, zipped)
    for path in (plain, zipped):
        with pytest.raises(SimplifierWeightsError) as error:
            load_released(path, "cpu")
        assert str(path) in _one_line(error) and "refused" in str(error.value)
        assert not marker.exists()


# ---------------------------------------------------------------------------- our weights


def test_safetensors_round_trip_is_exact(tmp_path):
    torch.manual_seed(3)
    model = Simplifier(0.125, mean=0.9, std=0.2).eval()
    path = tmp_path / "weights" / "simplifier.safetensors"
    command = "dfd-data train-simplifier out.safetensors --width 0.125 --seed 3"
    save_simplifier(model, path, {"command": command, "seed": 3, "crop": [128, 256], "note": "42"})
    assert not list(path.parent.glob(".dfd-tmp-*"))
    loaded = load_simplifier(path, "cpu", precision="fp32")
    assert (loaded.width, loaded.mean, loaded.std) == (0.125, 0.9, 0.2)
    assert loaded.metadata["command"] == command and loaded.metadata["seed"] == 3
    assert loaded.metadata["crop"] == [128, 256] and loaded.metadata["note"] == "42"  # strings stay strings
    assert read_simplifier_metadata(path)["architecture"]["channels"] == model.channels
    restored = loaded.state_dict()
    assert all(torch.equal(restored[key], value) for key, value in model.state_dict().items())
    x = torch.rand(2, 1, 45, 61)
    with torch.inference_mode():  # the loaded model convolves channels-last: equal up to rounding
        torch.testing.assert_close(model(x), loaded(x), rtol=1e-5, atol=1e-6)
    # a model loaded for inference may hold transformed weights: saving it would write a file
    # that no longer loads, so it is refused and nothing is written
    with pytest.raises(ValueError, match="loaded for inference"):
        save_simplifier(loaded, tmp_path / "resaved.safetensors")
    assert not (tmp_path / "resaved.safetensors").exists()


def test_load_simplifier_refuses_inconsistent_files(tmp_path):
    from safetensors.torch import save_file

    model = Simplifier(0.125)
    lying = tmp_path / "lying.safetensors"
    arch = dict(model.architecture(), width=0.25, channels=None)
    save_file(model.state_dict(), str(lying), metadata={"architecture": json.dumps(arch)})
    with pytest.raises(SimplifierWeightsError) as error:
        load_simplifier(lying, "cpu")
    assert str(lying) in _one_line(error)

    bare = tmp_path / "bare.safetensors"
    save_file(model.state_dict(), str(bare))
    with pytest.raises(SimplifierWeightsError) as error:
        load_simplifier(bare, "cpu")
    assert "architecture" in _one_line(error)


def test_missing_default_simplifier_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(simplifier_module, "DEFAULT_SIMPLIFIER", tmp_path / "simplifier_compact.safetensors")
    with pytest.raises(ModelMissingError) as error:
        default_simplifier_path()
    assert "simplifier_compact.safetensors" in _one_line(error)


def test_simplify_keeps_sizes_order_and_dtype(tiny):
    rng = np.random.default_rng(0)
    sketches = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((101, 77), (64, 64), (101, 77), (33, 20), (101, 77))]
    together = simplify(tiny, sketches, batch_size=2)
    assert [s.shape for s in together] == [s.shape for s in sketches]
    assert all(s.dtype == np.uint8 for s in together)
    one_by_one = [simplify(tiny, [s], batch_size=1)[0] for s in sketches]
    for a, b in zip(together, one_by_one):
        assert np.abs(a.astype(int) - b).max() <= 1  # batching may change float rounding only
    assert simplify(tiny, []) == []
    with pytest.raises(ValueError, match="sketch 0"):
        simplify(tiny, [np.zeros((10, 10), np.float32)])


# ---------------------------------------------------------------------------- pairs


def test_pair_generator_is_deterministic():
    a, b = RoughSketchGenerator(7), RoughSketchGenerator(7)
    for _ in range(3):
        (ra, ca), (rb, cb) = a.procedural_pair(96), b.procedural_pair(96)
        assert np.array_equal(ra, rb) and np.array_equal(ca, cb)
        assert ra.shape == ca.shape == (96, 96) and ra.dtype == ca.dtype == np.uint8
    clean = procedural_clean_lines(5, 200)
    assert np.array_equal(RoughSketchGenerator(1).pair(clean, 80)[0], RoughSketchGenerator(1).pair(clean, 80)[0])
    assert not np.array_equal(RoughSketchGenerator(1).procedural_pair(96)[0], RoughSketchGenerator(2).procedural_pair(96)[0])
    assert np.array_equal(degrade(clean, 3), degrade(clean, np.random.default_rng(3)))
    assert np.array_equal(degrade(clean, 3, strength=0.0), clean)


def test_rough_versions_add_and_move_ink_but_keep_the_drawing():
    rng = np.random.default_rng(0)
    components = {"clean": 0, "rough": 0}
    far, kept = [], []
    for _ in range(12):
        clean = procedural_clean_lines(rng, 192)
        rough = degrade(clean, rng, 1.0)
        assert not np.array_equal(rough, clean)
        clean_ink, rough_ink = clean < 128, rough < 128
        assert clean_ink.any()
        components["clean"] += cv2.connectedComponents(clean_ink.astype(np.uint8))[0] - 1
        components["rough"] += cv2.connectedComponents(rough_ink.astype(np.uint8))[0] - 1
        far.append(distance_to_ink(clean_ink)[rough_ink] > 3)   # rough ink away from every clean line
        kept.append(distance_to_ink(rough_ink)[clean_ink] <= 2)  # clean ink still drawn in the rough
    assert components["rough"] > 1.5 * components["clean"]
    assert np.concatenate(far).mean() > 0.05
    assert np.concatenate(kept).mean() > 0.6


def test_procedural_lines_look_like_clean_drawings():
    drawing = procedural_clean_lines(np.random.default_rng(4), (300, 200))
    assert drawing.shape == (300, 200) and drawing.dtype == np.uint8
    ink = drawing < 128
    assert 0.005 < ink.mean() < 0.2  # lines on paper, not tone
    assert (drawing > 250).mean() > 0.7


# ---------------------------------------------------------------------------- training


def test_loss_weights_favour_lines_on_paper():
    target = torch.ones(1, 1, 9, 9)
    target[0, 0, 4, 4] = 0.0
    weights = loss_weights(target)[0, 0]
    assert weights[4, 4] == pytest.approx(np.exp(-1 / 25) + 0.5, abs=1e-6)
    assert weights[4, 2] == pytest.approx(np.exp(-24 / 25) + 0.5, abs=1e-6)
    assert weights[0, 0] == pytest.approx(np.exp(-1.0) + 0.5, abs=1e-6)  # borders count only real pixels


def test_resume_without_a_checkpoint_says_it_starts_at_step_0(tmp_path, monkeypatch):
    """--resume where no run left a checkpoint (a mistyped path, a run that finished) starts
    afresh, as train --resume does, and says so once the arguments have passed their checks
    (a --clean folder without sketches is its error alone), before the run's minutes begin."""
    from click.testing import CliRunner

    from dfd_data import train_simplifier as module
    from dfd_data.cli import main

    def stop(*args, **kwargs):  # (the first step after the note: the run itself is not this test's)
        raise TrainingError("stopped here")

    monkeypatch.setattr(module, "input_statistics", stop)
    out, checkpoint = tmp_path / "simplifier.safetensors", tmp_path / "simplifier.ckpt.safetensors"
    note = f"train-simplifier: no checkpoint at {checkpoint}: starting at step 0"
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["train-simplifier", str(out), "--clean", str(tmp_path / "empty"), "--resume"])
    assert result.exit_code != 0 and "no PNG/JPG sketches" in result.output and note not in result.output
    result = CliRunner().invoke(main, ["train-simplifier", str(out), "--steps", "1", "--resume", "--device", "cpu"])
    assert result.exit_code != 0 and result.output.splitlines()[0] == note, result.output
    assert "stopped here" in result.output
    checkpoint.write_bytes(b"")  # (its contents are train_simplifier's to check)
    notes = []
    with pytest.raises(TrainingError, match="stopped here"):
        module.train_simplifier(out, steps=1, resume=True, device="cpu", progress=False, echo=notes.append)
    assert notes == []


def test_short_training_lowers_the_loss_and_saves_everything(tmp_path):
    out = tmp_path / "run" / "simplifier.safetensors"
    command = "dfd-data train-simplifier run/simplifier.safetensors --width 0.0625 --steps 40"
    stats = train_simplifier(out, width=0.0625, steps=40, batch_size=4, crop=64, lr=2e-3, seed=0, device="cpu",
                             log_every=1, progress=False, command=command, eval_pairs=2, checkpoint_every=20,
                             threads=1)  # tiny tensors: a second thread only adds synchronisation
    losses = [row["loss"] for row in stats["loss_history"]]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    model = load_simplifier(out, "cpu")
    assert model.width == 0.0625
    assert model.metadata["command"] == command
    assert (model.metadata["seed"], model.metadata["steps"]) == (0, 40)
    assert json.loads((out.parent / "simplifier.stats.json").read_text())["final"] is True
    assert not (out.parent / "simplifier.ckpt.safetensors").exists()
    assert set(stats["held_out"]) >= {"f_score_output", "f_score_rough"}


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    settings = dict(width=0.0625, steps=12, batch_size=2, crop=48, lr=2e-3, seed=1, device="cpu", log_every=4,
                    progress=False, eval_pairs=0, checkpoint_every=6, threads=1)
    straight = tmp_path / "straight.safetensors"
    train_simplifier(straight, **settings)

    resumed = tmp_path / "resumed.safetensors"
    real_batch, calls = PairSource.batch, []

    def dies_at_step_nine(self, size, count):
        calls.append(size)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return real_batch(self, size, count)

    monkeypatch.setattr(PairSource, "batch", dies_at_step_nine)
    with pytest.raises(KeyboardInterrupt):
        train_simplifier(resumed, **settings)
    monkeypatch.setattr(PairSource, "batch", real_batch)
    assert (tmp_path / "resumed.ckpt.safetensors").exists() and not resumed.exists()
    train_simplifier(resumed, resume=True, **settings)
    a, b = load_simplifier(straight, "cpu"), load_simplifier(resumed, "cpu")
    assert all(torch.equal(a.state_dict()[key], b.state_dict()[key]) for key in a.state_dict())
    assert a.metadata["final_loss"] == b.metadata["final_loss"]  # the loss history resumed too
    checkpoint = tmp_path / "resumed.ckpt.safetensors"
    checkpoint.write_bytes((tmp_path / "straight.safetensors").read_bytes()[:4000])  # a checkpoint cut short
    with pytest.raises(TrainingError, match="not a readable train-simplifier checkpoint"):
        train_simplifier(resumed, resume=True, **settings)
    with pytest.raises(TrainingError, match="crop range 33..39 holds no multiple of 8"):
        train_simplifier(resumed, **{**settings, "crop": (33, 39)})


def test_evaluate_denoising_reports_output_and_rough_scores(tiny):
    pairs = make_eval_pairs(0, count=2, size=64)
    report = evaluate_denoising(tiny, pairs)
    assert report["pairs"] == 2
    for key in ("precision", "recall", "f_score"):
        assert 0.0 <= report[f"{key}_output"] <= 1.0 and 0.0 <= report[f"{key}_rough"] <= 1.0
    assert 0.0 <= report["mae_output"] <= 255.0 and report["mae_rough"] > 0.0


# ---------------------------------------------------------------------------- line F-score


def test_line_f_score_sanity():
    lines = np.full((40, 40), 255, np.uint8)
    cv2.line(lines, (5, 20), (35, 20), 0, 1)
    cv2.circle(lines, (20, 10), 6, 0, 1)
    blank = np.full_like(lines, 255)
    assert line_f_score(lines, lines) == 1.0
    assert line_f_score(blank, blank) == 1.0
    assert line_f_score(blank, lines) == 0.0 and line_f_score(lines, blank) == 0.0
    shifted = np.roll(lines, 1, axis=1)
    assert line_f_score(shifted, lines, tol=2) == 1.0
    assert line_f_score(np.roll(lines, 6, axis=0), lines, tol=2) < 0.5
    half = lines.copy()
    half[:, 20:] = 255
    scores = line_scores(half, lines)
    assert scores["precision"] == 1.0 and scores["recall"] < 0.8
    with pytest.raises(ValueError):
        line_scores(lines, lines[:30])
    with pytest.raises(ValueError, match="expected a uint8 sketch"):  # a float page in 0..1 read as all ink
        line_scores(blank / 255.0, lines)


def test_a_broken_clean_sketch_stops_training_before_it_starts(tmp_path):
    from dfd_data.image_io import encode_png
    from dfd_data.train_simplifier import TrainingError, find_clean_sketches

    (tmp_path / "good.png").write_bytes(encode_png(np.full((64, 64), 255, np.uint8)))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(TrainingError, match=r"clean sketch .*bad\.png: not an image"):
        find_clean_sketches([tmp_path])

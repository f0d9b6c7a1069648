"""Two-stage training, resume, checkpoints and generation on real aligned faces.

Models are tiny (a few hundred thousand parameters at 128 px) so each step takes tens of
milliseconds on one core; what is checked is behaviour: losses fall on real sketch crops,
an interrupted and resumed run repeats the uninterrupted run's losses exactly, damaged
checkpoints are refused, and the saved model folder generates faces from sketch files.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfd_data.components import COMPONENTS
from dfd_data.dataset import Dataset
from dfd_data.errors import UserError
from dfd_data.image_io import ImageError, encode_png, read_image
from dfd_model.checkpoint import untrained_warning
from dfd_model.cli import main
from dfd_model.config import ModelConfig
from dfd_model.generate import letterbox, load_sketch, photo_reason
from dfd_model.sketch_to_face import SketchToFace
from dfd_model.training import TrainConfig, Trainer, TrainingError
from dfd_model.training_checkpoint import TrainingCheckpointError

from tests.conftest import REPO, TINY_128, TINY_SETTINGS, dfd_data, label_dataset, run_losses
from tests.hostile import fill_disk_after

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def real_dataset(tmp_path_factory, shared_data) -> Path:
    """12 female and 12 male CelebA-HQ photos of ../shared/data aligned at 128 px, photocopy
    sketches, genders from the file names, every sixth face held out as the test split."""
    photos = tmp_path_factory.mktemp("celeba")
    files = sorted((shared_data / "celebahq").iterdir())  # female_* first, then male_*
    for path in files[:12] + files[-12:]:
        shutil.copy(path, photos / path.name)
    root = tmp_path_factory.mktemp("real-dataset") / "faces"
    assert dfd_data("align", photos, root, "--size", "128", "--jobs", "2").returncode == 0
    assert dfd_data("build-sketches", root, "--method", "photocopy", "--jobs", "2", "--quiet").returncode == 0
    ids = sorted(json.loads(line)["id"] for line in (root / "records.jsonl").read_text().splitlines())
    label_dataset(root, [(i, "female" if "female" in i else "male", "test" if n % 6 == 5 else "train")
                  for n, i in enumerate(ids)])
    return root


def _trainer(dataset, out, resume=False, **train) -> Trainer:
    config = TrainConfig(**{"steps": 6, "batch_size": 2, "log_every": 1, "grid_every": 3, "checkpoint_every": 2,
                            "l1_weight": 10.0, **train})
    return Trainer(dataset, out, ModelConfig(**TINY_128), config, torch.device("cpu"), resume=resume, quiet=True,
                   echo=lambda line: None)


def _window_mean(values: list[float], first: bool, size: int = 8) -> float:
    return float(np.mean(values[:size] if first else values[-size:]))


def test_both_stages_learn_on_real_sketch_crops(real_dataset, tmp_path):
    trainer = _trainer(real_dataset, tmp_path / "run", steps=40, batch_size=4, grid_every=100, checkpoint_every=100)
    assert len(trainer.pairs) == 20 and len(trainer.validation) == 4  # the test split is held out
    trainer.run("all")
    rows = run_losses(tmp_path / "run")
    stage1 = [losses["total"] for stage, _, losses in rows if stage == 1]
    stage2 = [losses["g_l1"] for stage, _, losses in rows if stage == 2]
    assert _window_mean(stage1, False) < 0.75 * _window_mean(stage1, True)
    assert _window_mean(stage2, False) < 0.9 * _window_mean(stage2, True)
    model = SketchToFace.from_pretrained(tmp_path / "run" / "model", device="cpu")
    assert model.genders == ("female", "male")
    counts = model.banks.counts()
    assert sum(counts["nose"].values()) == 20  # every training sketch, split by gender
    grids = sorted(p.name for p in (tmp_path / "run" / "grids").iterdir())
    assert grids == ["stage1-step0000000.jpg", "stage1-step0000040.jpg", "stage2-step0000000.jpg",
                     "stage2-step0000040.jpg"]
    assert read_image(tmp_path / "run" / "grids" / "stage2-step0000040.jpg").shape == (2 * 128, 6 * 128, 3)  # two faces a row


def test_a_resumed_run_repeats_the_uninterrupted_losses(sketched_dataset, tmp_path, monkeypatch):
    """Killed in stage 2 at step 4, resumed from the step-2 checkpoint: the same stats rows
    (each averaging three steps, so the row at step 3 spans the checkpoint) and weights."""
    _trainer(sketched_dataset, tmp_path / "whole", log_every=3).run("all")
    expected = run_losses(tmp_path / "whole")
    assert [(stage, step) for stage, step, _ in expected] == [(1, 3), (1, 6), (2, 3), (2, 6)]

    crash_at = {"calls": 0}
    original = Trainer.stage2_step

    def crashing(self, *args):
        crash_at["calls"] += 1
        if crash_at["calls"] == 4:  # stage 2 step 4 dies after the step-2 checkpoint was written
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Trainer, "stage2_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        _trainer(sketched_dataset, tmp_path / "cut", log_every=3).run("all")
    monkeypatch.setattr(Trainer, "stage2_step", original)
    with pytest.raises(TrainingError, match="pass --resume"):
        _trainer(sketched_dataset, tmp_path / "cut", log_every=3)
    resumed = _trainer(sketched_dataset, tmp_path / "cut", resume=True, log_every=3)
    assert (resumed.stage, resumed.step) == (2, 2)
    resumed.run("all")
    assert run_losses(tmp_path / "cut") == expected
    whole = SketchToFace.from_pretrained(tmp_path / "whole" / "model", device="cpu").state_dict()
    cut = SketchToFace.from_pretrained(tmp_path / "cut" / "model", device="cpu").state_dict()
    assert all(torch.equal(whole[key], cut[key]) for key in whole)


def test_restored_adam_moments_keep_channels_last_weights_in_step(tmp_path):
    """Fused Adam pairs a weight's values with its moments' in memory order; the checkpoint
    stores the moments contiguous, so restored into a channels-last convolution they must
    take its layout again, or the next step mixes up values (it did, by 1.6 times the lr).
    And a checkpoint of unfused Adam (older runs) resumes with the fused kernel."""
    from dfd_model.training_checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    weights = torch.randn(8, 4, 3, 3)

    def conv_and_adam():
        conv = torch.nn.Conv2d(4, 8, 3, bias=False).to(memory_format=torch.channels_last)
        conv.weight.data.copy_(weights)
        return conv, torch.optim.Adam(conv.parameters(), 1e-2, fused=True)

    def step(conv, adam, gradient):
        conv.weight.grad = gradient.clone().to(memory_format=torch.channels_last)
        adam.step()

    gradients = torch.randn(2, 8, 4, 3, 3)
    uninterrupted, adam = conv_and_adam()
    step(uninterrupted, adam, gradients[0])
    save_checkpoint(tmp_path, "one", modules={"conv": uninterrupted}, optimizers={"adam": adam}, banks=None,
                    state={})
    step(uninterrupted, adam, gradients[1])
    resumed, resumed_adam = conv_and_adam()
    load_checkpoint(tmp_path / "checkpoints" / "one", modules={"conv": resumed}, optimizers={"adam": resumed_adam},
                    device=torch.device("cpu"))
    step(resumed, resumed_adam, gradients[1])
    assert torch.equal(resumed.weight, uninterrupted.weight)

    unfused = torch.optim.Adam(uninterrupted.parameters(), 1e-2)
    step(uninterrupted, unfused, gradients[0])
    save_checkpoint(tmp_path, "unfused", modules={"conv": uninterrupted}, optimizers={"adam": unfused}, banks=None,
                    state={})
    load_checkpoint(tmp_path / "checkpoints" / "unfused", modules={"conv": resumed},
                    optimizers={"adam": resumed_adam}, device=torch.device("cpu"))
    assert resumed_adam.param_groups[0]["fused"]


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc/self/maps")
def test_a_resumed_run_keeps_nothing_of_the_checkpoint_file_mapped(tmp_path):
    """Checkpoints are read through a memory map of their file. Whatever the run keeps (Adam's
    steps, the banks) must be copies: one four-byte step viewing the map had kept the full
    model's 6.3 GiB file mapped for the rest of the run, and on disk once pruned."""
    from dfd_model.projection import FeatureBank
    from dfd_model.training_checkpoint import load_checkpoint, save_checkpoint

    def conv_and_adam():
        conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
        return conv, torch.optim.Adam(conv.parameters(), 1e-2, fused=True)

    conv, adam = conv_and_adam()
    conv(torch.randn(1, 4, 5, 5)).sum().backward()
    adam.step()
    banks = FeatureBank({"nose": {"female": torch.randn(6, 3)}})
    save_checkpoint(tmp_path, "one", modules={"conv": conv}, optimizers={"adam": adam}, banks=banks, state={})
    resumed, resumed_adam = conv_and_adam()
    _, loaded_banks = load_checkpoint(tmp_path / "checkpoints" / "one", modules={"conv": resumed},
                                      optimizers={"adam": resumed_adam}, device=torch.device("cpu"))
    assert torch.equal(loaded_banks.get("nose", "female"), banks.get("nose", "female"))
    restored, saved = resumed_adam.state[resumed.weight], adam.state[conv.weight]
    assert restored.keys() == saved.keys() and all(torch.equal(restored[key], saved[key]) for key in saved)
    tensors_file = str((tmp_path / "checkpoints" / "one" / "tensors.safetensors").resolve())
    assert not [line for line in Path("/proc/self/maps").read_text().splitlines() if tensors_file in line]


def test_adam_steps_restore_as_steps_and_other_optimisers_are_refused(tmp_path):
    """A 0-d parameter's step has its shape but is no moment: it stays a float32 count
    (restored as the parameter it had stopped counting at 256 in bf16). An optimiser whose
    groups differ from the checkpoint's is refused with one line naming the file."""
    from dfd_model.training_checkpoint import TrainingCheckpointError, load_checkpoint, save_checkpoint

    def scalar_and_adam():
        scalar = torch.nn.ParameterDict({"gain": torch.nn.Parameter(torch.tensor(1.0, dtype=torch.bfloat16))})
        return scalar, torch.optim.Adam(scalar.parameters(), 1e-3)

    scalar, adam = scalar_and_adam()
    for _ in range(3):
        scalar["gain"].grad = torch.tensor(0.5, dtype=torch.bfloat16)
        adam.step()
    save_checkpoint(tmp_path, "one", modules={"scalar": scalar}, optimizers={"adam": adam}, banks=None, state={})
    resumed, resumed_adam = scalar_and_adam()
    load_checkpoint(tmp_path / "checkpoints" / "one", modules={"scalar": resumed}, optimizers={"adam": resumed_adam},
                    device=torch.device("cpu"))
    step = resumed_adam.state[resumed["gain"]]["step"]
    assert step.dtype == torch.float32 and float(step) == 3.0

    two = torch.nn.ParameterDict({"gain": torch.nn.Parameter(torch.tensor(1.0, dtype=torch.bfloat16))})
    other = torch.optim.Adam([*two.parameters(), torch.nn.Parameter(torch.ones(2))], 1e-3)
    with pytest.raises(TrainingCheckpointError, match=r"tensors\.safetensors: the adam optimiser does not match"):
        load_checkpoint(tmp_path / "checkpoints" / "one", modules={"scalar": two}, optimizers={"adam": other},
                        device=torch.device("cpu"))


def test_mixed_precision_is_for_stage_two_and_leaves_the_latents_float32(sketched_dataset, tmp_path, monkeypatch):
    """Where bf16 is native (AMX CPUs; faked here so every machine checks it), stage 2's
    generator computes in bf16 while its latents are encoded in float32, as the banks are;
    stage 1 trains in float32 (bf16 made it no faster and its reconstructions
    worse). Without native bf16, or with amp off, everything is float32."""
    import dfd_model.training as training

    def dtypes_seen(trainer) -> dict[str, set]:
        seen = {"encoder": set(), "generator": set()}
        trainer.model.autoencoders["nose"].encoder.fc.register_forward_hook(
            lambda module, inputs, output: seen["encoder"].add(output.dtype))
        trainer.model.generator.register_forward_hook(lambda module, inputs, output: seen["generator"].add(output.dtype))
        sketches, photos = trainer.pairs.batch(np.arange(2))
        trainer.stage1_step(sketches)
        stage1 = set(seen["encoder"])
        seen["encoder"].clear()
        trainer.stage2_step(sketches, photos)
        return {"stage 1": stage1, "stage 2 latents": seen["encoder"], "stage 2 faces": seen["generator"]}

    monkeypatch.setattr(training, "native_bf16", lambda device: True)
    mixed = _trainer(sketched_dataset, tmp_path / "mixed")
    assert mixed.precision == "bf16"
    assert dtypes_seen(mixed) == {"stage 1": {torch.float32}, "stage 2 latents": {torch.float32},
                                  "stage 2 faces": {torch.bfloat16}}
    plain = _trainer(sketched_dataset, tmp_path / "plain", amp=False)
    assert plain.precision == "fp32" and all(seen == {torch.float32} for seen in dtypes_seen(plain).values())
    monkeypatch.setattr(training, "native_bf16", lambda device: False)
    assert _trainer(sketched_dataset, tmp_path / "no-bf16").precision == "fp32"
    # a run resumed on a machine without native bf16: said, not silent
    monkeypatch.setattr(training, "native_bf16", lambda device: True)
    _trainer(sketched_dataset, tmp_path / "moved", steps=1).run("1")
    monkeypatch.setattr(training, "native_bf16", lambda device: False)
    lines = []
    Trainer(sketched_dataset, tmp_path / "moved", ModelConfig(**TINY_128), TrainConfig(), torch.device("cpu"),
            resume=True, given=set(), quiet=True, echo=lines.append).close()
    assert "warning: the run trained stage 2 in bf16, this machine does in fp32: training goes on, but not as the " \
           "run would have" in lines


def test_fp16_steps_that_all_overflow_stop_training_instead_of_skipping_it(sketched_dataset, tmp_path, monkeypatch):
    """On GPUs without bf16, stage 2 runs in fp16 with a loss scaler, which skips each step
    whose gradients overflow and halves its scale: the losses stay finite while nothing trains.
    Generator steps skipped MAX_SKIPPED_STEPS times in a row stop the run (fp16 autocast on the
    CPU stands in for the GPU's; 4 skips here); the stats record the scale; a resume does not
    restore a scale below 1, and may turn amp off as the message advises."""
    import dfd_model.training as training

    monkeypatch.setattr(training, "_amp_context", lambda device, enabled: (
        (lambda: torch.autocast("cpu", dtype=torch.float16), torch.amp.GradScaler("cpu", init_scale=4.0), "fp16")
        if enabled else (contextlib.nullcontext, None, "fp32")))
    monkeypatch.setattr(training, "MAX_SKIPPED_STEPS", 4)
    run = tmp_path / "run"
    trainer = _trainer(sketched_dataset, run, steps=8, checkpoint_every=1)
    weight = trainer.model.generator.model[1].weight
    weight.register_hook(lambda gradient: gradient * float("nan") if trainer.stage == 2 else gradient)
    with pytest.raises(TrainingError) as stopped:
        trainer.run("all")
    assert str(stopped.value) == ("stage 2 step 4: the generator's fp16 gradients overflowed on the last 4 steps, so "
                                  "it did not train on them (loss scale 0.25); resume from the last checkpoint with a "
                                  "lower --lr, or with --set amp=false")
    assert torch.isfinite(weight).all()
    assert all(float(state["step"]) == 0 for state in trainer.optimizers["generator"].state.values())  # never stepped
    scales = [row.get("loss_scale") for row in map(json.loads, (run / "stats.jsonl").read_text().splitlines())]
    assert scales == [None] * 8 + [2.0, 1.0, 0.5]  # (stage 1's rows have none; step 4 stopped before its row)
    lines = []
    resumed = Trainer(sketched_dataset, run, ModelConfig(**TINY_128), TrainConfig(lr=1e-4), torch.device("cpu"),
                      resume=True, given={"lr"}, quiet=True, echo=lines.append)
    assert "the checkpoint's fp16 loss scale (0.5) is below 1: the scale starts afresh" in lines
    assert resumed.step == 3 and resumed.scaler.get_scale() == 4.0
    resumed.close()
    plain = Trainer(sketched_dataset, run, ModelConfig(**TINY_128), TrainConfig(amp=False), torch.device("cpu"),
                    resume=True, given={"amp"}, quiet=True, echo=lambda line: None)
    assert plain.precision == "fp32" and plain.scaler is None
    plain.run("all")


def test_fp16_discriminator_steps_that_all_overflow_stop_training_too(sketched_dataset, tmp_path, monkeypatch):
    """The discriminator's overflows halve the scale the generator shares, until its scaled
    gradients round to zero: its skipped steps stop the run as the generator's do."""
    import dfd_model.training as training

    monkeypatch.setattr(training, "_amp_context", lambda device, enabled: (
        lambda: torch.autocast("cpu", dtype=torch.float16), torch.amp.GradScaler("cpu", init_scale=4.0), "fp16"))
    monkeypatch.setattr(training, "MAX_SKIPPED_STEPS", 4)
    trainer = _trainer(sketched_dataset, tmp_path / "run", steps=12, checkpoint_every=100)
    weight = next(trainer.discriminator.parameters())
    weight.register_hook(lambda gradient: gradient * float("nan"))
    with pytest.raises(TrainingError, match=r"^stage 2 step 4: the discriminator's fp16 gradients overflowed on the "
                                            r"last 4 steps, so it did not train on them \(loss scale 0.25\)"):
        trainer.run("all")
    assert trainer.optimiser_steps("generator") == 4 and trainer.optimiser_steps("discriminator") == 0


def test_stage_two_needs_stage_one_and_settings_must_match_on_resume(sketched_dataset, tmp_path):
    with pytest.raises(TrainingError, match="needs a finished stage 1"):
        _trainer(sketched_dataset, tmp_path / "run").run("2")
    with pytest.raises(TrainingError, match="needs a finished stage 1"):  # told before the pairs are stacked
        Trainer(sketched_dataset, tmp_path / "fresh", ModelConfig(**TINY_128), TrainConfig(), torch.device("cpu"),
                stage="2", quiet=True, echo=lambda line: None)
    assert not (tmp_path / "fresh" / "data").exists()
    # a 128 px model's deepest autoencoder maps are 1 pixel: batch norm needs a batch of 2
    with pytest.raises(TrainingError, match="--batch-size 1 is too small at resolution 128"):
        _trainer(sketched_dataset, tmp_path / "small", batch_size=1)
    _trainer(sketched_dataset, tmp_path / "run", steps=2).run("1")
    assert (tmp_path / "run" / "model" / "banks.safetensors").is_file()
    assert "saved after training stage 1 only" in untrained_warning(tmp_path / "run" / "model")
    with pytest.raises(TrainingError, match="pass --resume"):  # and train_config.json is left as it was
        _trainer(sketched_dataset, tmp_path / "run", steps=2, lr=1e-3)
    with pytest.raises(TrainingError, match=r"settings \(training.seed was 0, given 1\)"):  # (what each was, too)
        _trainer(sketched_dataset, tmp_path / "run", resume=True, steps=2, seed=1)
    summary = _trainer(sketched_dataset, tmp_path / "run", resume=True, steps=2).run("2")
    assert summary.startswith("train: stage 2: 2 steps")
    assert untrained_warning(tmp_path / "run" / "model") is None


def test_resuming_keeps_the_runs_own_settings_and_data(sketched_dataset, tmp_path):
    """A resume takes the run's settings where none are given, and a new lr where one is (the
    optimisers step with it); it finds the newest checkpoint when latest.json was lost, and
    refuses pairs other than those the run was trained on."""
    dataset = tmp_path / "faces"
    shutil.copytree(sketched_dataset, dataset)
    run = tmp_path / "run"
    _trainer(dataset, run, steps=2).run("1")
    assert json.loads((run / "train_config.json").read_text())["training"]["sketches"] == "photocopy"  # pinned
    (run / "checkpoints" / "latest.json").unlink()
    with pytest.raises(TrainingError, match="already holds a training run"):
        _trainer(dataset, run, steps=2)
    lines = []
    resumed = Trainer(dataset, run, ModelConfig(**TINY_128), TrainConfig(lr=1e-4), torch.device("cpu"), resume=True,
                      given={"lr"}, quiet=True, echo=lines.append)
    assert (resumed.stage, resumed.step, resumed.config.steps, resumed.config.batch_size) == (2, 0, 2, 2)
    assert "resuming with lr 0.0002 -> 0.0001" in lines
    assert {group["lr"] for optimizer in resumed.optimizers.values() for group in optimizer.param_groups} == {1e-4}
    resumed.close()
    (run / "data" / "sketches.npy").write_bytes(b"damaged")  # only a cache: stacked again
    assert _trainer(dataset, run, resume=True, steps=2, lr=1e-4).pairs.sketches.shape[0] > 0
    # a run from before the sketch set was recorded, resumed once the dataset has a second set
    saved = json.loads((run / "train_config.json").read_text())
    saved["training"]["sketches"] = None
    (run / "train_config.json").write_text(json.dumps(saved))
    assert dfd_data("build-sketches", dataset, "--method", "canny", "--quiet").returncode == 0
    with pytest.raises(UserError, match="holds several sketch sets"):
        _trainer(dataset, run, resume=True, steps=2, lr=1e-4)
    assert _trainer(dataset, run, resume=True, steps=2, lr=1e-4, sketches="photocopy").config.sketches == "photocopy"
    with pytest.raises(TrainingError, match="training.sketches"):
        _trainer(dataset, run, resume=True, steps=2, lr=1e-4, sketches="canny")
    label_dataset(dataset, [(r["id"], "female", "train") for r in Dataset(dataset).aligned()])
    stacked = (run / "data" / "sketches.npy").stat().st_mtime_ns
    with pytest.raises(TrainingError, match="was trained on other pairs"):
        _trainer(dataset, run, resume=True, steps=2, lr=1e-4)
    assert (run / "data" / "sketches.npy").stat().st_mtime_ns == stacked  # refused before stacking the new pairs
    # before its first checkpoint a run has trained nothing: any setting may change on resuming
    _trainer(dataset, tmp_path / "fresh", steps=2, sketches="canny").close()
    assert _trainer(dataset, tmp_path / "fresh", resume=True, steps=2, batch_size=4).config.batch_size == 4


def test_what_a_run_folder_holds_is_never_trained_over(sketched_dataset, tmp_path):
    """A run whose checkpoints were removed (to free room: the full model's take 6 GiB each)
    keeps its model: neither a fresh run nor a resume trains over it, nor a fresh run over its
    stats (both had replaced them without a word). A run folder inside the dataset is refused
    before it is made, and aligned faces without a sketch are said to be left out."""
    dataset = tmp_path / "faces"
    shutil.copytree(sketched_dataset, dataset)
    run = tmp_path / "run"
    _trainer(dataset, run, steps=2).run("all")
    model = (run / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(run / "checkpoints")
    for resume in (False, True):
        with pytest.raises(TrainingError, match="holds a trained model but no checkpoint"):
            _trainer(dataset, run, resume=resume, steps=2)
    assert (run / "model" / "model.safetensors").read_bytes() == model
    shutil.rmtree(run / "model")
    with pytest.raises(TrainingError, match=r"already holds a training run \(its stats.jsonl\)"):
        _trainer(dataset, run, steps=2)
    _trainer(dataset, run, resume=True, steps=2).close()  # (stopped before a checkpoint: it starts again)
    for inside in (dataset, dataset / "runs" / "one"):
        with pytest.raises(TrainingError, match="must not be inside the dataset"):
            _trainer(dataset, inside, steps=2)
    assert not (dataset / "runs").exists() and not (dataset / "train_config.json").exists()
    sketches = dataset / "sketches" / "photocopy" / "records.jsonl"
    sketches.write_text("".join(line + "\n" for line in sketches.read_text().splitlines()[1:]))
    lines = []
    Trainer(dataset, tmp_path / "fewer", ModelConfig(**TINY_128), TrainConfig(steps=2, batch_size=2),
            torch.device("cpu"), quiet=True, echo=lines.append).close()
    assert "1 aligned face has no photocopy sketch and is left out: run dfd-data build-sketches to add them" in lines
    with pytest.raises(ValueError, match="amp must be true or false"):  # ("disable" had been taken as on)
        TrainConfig(amp="disable")
    assert (TrainConfig(amp=0).amp, TrainConfig(amp=1).amp) == (False, True)


def test_resume_without_out_takes_the_latest_run(sketched_dataset, tmp_path, monkeypatch):
    """--resume without --out had started a new run, with the default full-size settings, in
    the next free runs/run-NNN; it now resumes the latest one, and says so where there is none."""
    from dfd_model import training

    folders = []

    def recorded(dataset, out, *args, **kwargs):  # (nothing trains, whatever folder the command picks)
        folders.append(Path(out))
        raise TrainingError("recorded")

    monkeypatch.setattr(training, "Trainer", recorded)
    monkeypatch.chdir(tmp_path)
    none = CliRunner().invoke(main, ["train", str(sketched_dataset), "--resume"])
    assert none.exit_code == 2 and "resumes the latest runs/run-NNN, and there is none here" in none.output
    (tmp_path / "runs" / "run-002").mkdir(parents=True)
    (tmp_path / "runs" / "run-010").mkdir()
    for resume in (["--resume"], []):
        assert CliRunner().invoke(main, ["train", str(sketched_dataset), *resume]).exit_code == 1
    assert folders == [Path("runs/run-010"), Path("runs/run-011")]


def test_a_batch_that_keeps_the_checkpoints_global_batch_is_taken_after_an_interrupted_resume(sketched_dataset,
                                                                                              tmp_path):
    """A resume on 2 processes with half the batch rewrites train_config.json before it trains;
    stopped before its first checkpoint, the run's own batch on one process is still taken (it
    had been refused), and without --batch-size the last one chosen is kept, with a warning."""
    run = tmp_path / "run"
    _trainer(sketched_dataset, run, steps=2, batch_size=4).run("1")
    saved = json.loads((run / "train_config.json").read_text())
    saved["training"]["batch_size"] = 2  # as `torchrun --nproc-per-node 2 ... --batch-size 2 --resume` writes it
    (run / "train_config.json").write_text(json.dumps(saved))
    given = Trainer(sketched_dataset, run, ModelConfig(**TINY_128), TrainConfig(steps=2, batch_size=4),
                    torch.device("cpu"), resume=True, given={"batch_size"}, quiet=True, echo=lambda line: None)
    assert given.config.batch_size == 4
    given.close()
    saved["training"]["batch_size"] = 2
    (run / "train_config.json").write_text(json.dumps(saved))
    lines = []
    kept = Trainer(sketched_dataset, run, ModelConfig(**TINY_128), TrainConfig(steps=2), torch.device("cpu"),
                   resume=True, given=set(), quiet=True, echo=lines.append)
    assert kept.config.batch_size == 2
    assert "warning: the run's global batch was 4 (1 processes), this one's is 2 (1): training goes on, but not as " \
        "the run would have" in lines
    kept.close()
    # (a setting chosen as None beside a saved value is refused, not multiplied by the processes)
    saved["training"]["vgg_weights"] = "vgg19.safetensors"
    (run / "train_config.json").write_text(json.dumps(saved))
    with pytest.raises(TrainingError,
                       match=r"other settings \(training.vgg_weights was 'vgg19.safetensors', given None\)"):
        _trainer(sketched_dataset, run, resume=True, steps=2, batch_size=2)


def test_a_damaged_checkpoint_or_run_config_is_refused(sketched_dataset, tmp_path):
    _trainer(sketched_dataset, tmp_path / "run", steps=2).run("1")
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["checkpoint"]
    tensors = tmp_path / "run" / "checkpoints" / latest / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(TrainingCheckpointError, match="damaged"):
        _trainer(sketched_dataset, tmp_path / "run", resume=True, steps=2)
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    state = tmp_path / "run" / "checkpoints" / latest / "state.json"
    original = state.read_text()
    state.write_text(original.replace('"step": 0', '"step": 1'))  # stage 2 step 0, edited
    with pytest.raises(TrainingCheckpointError, match=f"{state}: contents differ from the digest"):
        _trainer(sketched_dataset, tmp_path / "run", resume=True, steps=2)
    state.write_text(original)
    config = tmp_path / "run" / "train_config.json"
    config.write_text('{"model": ')
    with pytest.raises(TrainingError, match=f"{config}: unreadable"):
        _trainer(sketched_dataset, tmp_path / "run", resume=True, steps=2)


def test_a_crash_while_saving_the_stage_one_model_is_redone_on_resume(sketched_dataset, tmp_path, monkeypatch):
    original = Trainer._save_model

    def crash(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        _trainer(sketched_dataset, tmp_path / "run", steps=2).run("1")
    monkeypatch.setattr(Trainer, "_save_model", original)
    _trainer(sketched_dataset, tmp_path / "run", resume=True, steps=2).run("1")
    assert SketchToFace.from_pretrained(tmp_path / "run" / "model", device="cpu").banks is not None


def test_training_goes_on_when_no_validation_face_can_be_read(sketched_dataset, tmp_path):
    dataset = tmp_path / "faces"
    shutil.copytree(sketched_dataset, dataset)
    ids = sorted(json.loads(line)["id"] for line in (dataset / "records.jsonl").read_text().splitlines())
    label_dataset(dataset, [(ids[0], "female", "test"), (ids[1], "male", "train")])
    held_out = dataset / "sketches" / "photocopy" / f"{ids[0]}.png"
    held_out.write_bytes(held_out.read_bytes()[:100])
    lines = []
    config = TrainConfig(steps=2, batch_size=2, log_every=1, grid_every=1, checkpoint_every=2)
    trainer = Trainer(dataset, tmp_path / "run", ModelConfig(**TINY_128), config, torch.device("cpu"), quiet=True,
                      echo=lines.append)
    assert any(line.startswith("skipped for the validation grid: ") and str(held_out) in line for line in lines)
    assert "no face for the validation grid could be read: training goes on without grids" in lines
    assert trainer.run("1").startswith("train: stage 1: 2 steps")


def test_smoke_command_then_generate(sketched_dataset, tmp_path):
    """The issue's one-command smoke run (tiny widths), then generation from sketch files."""
    run = tmp_path / "smoke"
    command = [sys.executable, "-m", "dfd_model", "train", str(sketched_dataset), "--stage", "all", "--resolution",
               "128", "--steps", "3", "--batch-size", "2", "--out", str(run), "--quiet", *TINY_SETTINGS]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "resolution=128" in result.stdout and "train: stage 1: 3 steps" in result.stdout
    assert json.loads((run / "train_config.json").read_text())["model"]["ngf"] == 8
    # (the commands after the first, and the last generate, run in this process: 5 to 10 s of imports saved each)
    again = CliRunner().invoke(main, command[3:])
    assert again.exit_code == 1 and "pass --resume" in again.stderr and again.exception is not None
    assert not isinstance(again.exception, Exception)  # SystemExit: the one-line error, no traceback
    bare = CliRunner().invoke(main, ["train", str(sketched_dataset), "--out", str(run), "--resume", "--quiet"])
    assert bare.exit_code == 0, bare.output  # the run's own settings: not 50,000 steps at 512 px
    assert "train: nothing left to do" in bare.stdout and "steps=3" in bare.stdout

    sketch = read_image(next((sketched_dataset / "sketches" / "photocopy").glob("*.png")))[:, :, 0]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "wide.png").write_bytes(encode_png(np.pad(sketch, ((0, 0), (40, 40)), constant_values=255)))
    (inputs / "photo.png").write_bytes(encode_png(read_image(sketched_dataset / "images" /
                                                             next((sketched_dataset / "images").iterdir()).name)))
    out = tmp_path / "faces"
    result = subprocess.run([sys.executable, "-m", "dfd_model", "generate", "--model", str(run / "model"),
                             str(inputs), "-o", str(out), "--grid", "--refine", "0.5", "--refine", "nose=1",
                             "--gender", "male", "--quiet"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1  # the photo failed, and says why and what to do
    assert "photo.png: looks like a" in result.stderr and "--from-photo" in result.stderr
    assert "generate: 1 face, 1 failed" in result.stdout
    assert read_image(out / "wide.png").shape == (128, 128, 3)
    assert read_image(out / "grid.jpg").shape == (128, 3 * 128, 3)
    bad = CliRunner().invoke(main, ["generate", "--model", str(run / "model"), str(inputs), "-o", str(out),
                                    "--refine", "chin=0.5"])
    assert bad.exit_code == 2 and "unknown component 'chin'" in bad.stderr


def test_sketch_inputs_are_letterboxed_and_photos_recognised(sample_photos, tmp_path):
    wide = np.full((50, 100), 255, np.uint8)
    wide[:, 10] = 0
    boxed = letterbox(wide, 64)
    assert boxed.shape == (64, 64) and boxed[:16].min() == 255 and boxed[16:48].min() < 128
    strip = np.full((16, 1 << 20), 255, np.uint8)  # 16.8 MP: padded before resizing, a 1 TiB square
    assert letterbox(strip, 64).shape == (64, 64)
    colour = letterbox(np.zeros((50, 100, 3), np.uint8), 64)  # (evaluate's photos, as their sketches)
    assert colour.shape == (64, 64, 3) and colour[:16].min() == 255 and colour[16:48].max() == 0
    photo = read_image(sample_photos / "astronaut.png")
    assert photo_reason(photo) is not None
    assert photo_reason(np.repeat(boxed[:, :, None], 3, axis=2)) is None
    with pytest.raises(ImageError, match="astronaut.png: looks like"):
        load_sketch(sample_photos / "astronaut.png", 128)
    sketch = load_sketch(sample_photos / "astronaut.png", 128, from_photo="photocopy")
    assert sketch.shape == (128, 128) and np.mean(sketch > 200) > 0.5


def test_generate_draws_photos_in_the_models_precision(tiny_model_folder, sample_photos, tmp_path, monkeypatch):
    """`generate --precision fp32 --from-photo ...` ran the sketch networks in bf16 where that
    is native: the photo's sketch follows the model's precision."""
    import dfd_data.sketch_methods
    from dfd_model.generate import generate

    asked = []
    original = dfd_data.sketch_methods.run_method
    monkeypatch.setattr(dfd_data.sketch_methods, "run_method",
                        lambda *args, **kwargs: asked.append(kwargs.get("precision")) or original(*args, **kwargs))
    model = SketchToFace.from_pretrained(tiny_model_folder, device="cpu", precision="fp32")
    result = generate(model, [sample_photos / "astronaut.png"], tmp_path / "out", from_photo="photocopy", quiet=True)
    assert asked == ["fp32"] and not result.errors


def test_components_reach_every_output(sketched_dataset, tmp_path):
    """Generation uses every component: changing one window's strokes changes the face there."""
    _trainer(sketched_dataset, tmp_path / "run", steps=2).run("all")
    model = SketchToFace.from_pretrained(tmp_path / "run" / "model", device="cpu")
    sketch = torch.full((1, 128, 128), 255, dtype=torch.uint8)
    with torch.inference_mode():
        base = model(sketch, refine=0.0)
        window = model.config.windows()["mouth"]
        marked = sketch.clone()
        marked[:, window.y + 10:window.y + 14, window.x + 5:window.x + 50] = 0
        changed = model(marked, refine=0.0)
    assert not torch.equal(base, changed)
    assert set(model.encode(sketch, refine=0.0)) == set(COMPONENTS)


def test_perceptual_loss_runs_only_with_user_vgg_weights(sketched_dataset, tmp_path):
    from safetensors.torch import save_file

    from dfd_model.losses import VGG19Features

    weights = tmp_path / "vgg19.safetensors"
    save_file({f"features.{key}": value.contiguous() for key, value in VGG19Features().features.state_dict().items()},
              str(weights))
    _trainer(sketched_dataset, tmp_path / "run", steps=1, vgg_weights=str(weights)).run("all")
    stage2 = [losses for stage, _, losses in run_losses(tmp_path / "run") if stage == 2]
    assert stage2 and stage2[0]["g_vgg"] > 0
    _trainer(sketched_dataset, tmp_path / "plain", steps=1).run("all")
    assert all("g_vgg" not in losses for _, _, losses in run_losses(tmp_path / "plain"))

    truncated = tmp_path / "partial.safetensors"
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, str(truncated))
    with pytest.raises(TrainingError, match="lacks VGG19 tensor"):
        _trainer(sketched_dataset, tmp_path / "bad", steps=1, vgg_weights=str(truncated))
    pickled = tmp_path / "vgg19.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, pickled)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        VGG19Features.from_safetensors(pickled)


def test_evaluate_prints_all_four_metrics(real_dataset, tmp_path):
    """evaluate on a model trained from ../shared/data and its held-out faces."""
    _trainer(real_dataset, tmp_path / "run", steps=4).run("all")
    pairs = tmp_path / "pairs"
    (pairs / "sketches").mkdir(parents=True)
    (pairs / "photos").mkdir()
    held_out = [json.loads(line) for line in (real_dataset / "records.jsonl").read_text().splitlines()]
    held_out = [r for r in held_out if r.get("attributes", {}).get("split") == "test"]
    for record in held_out:
        shutil.copy(real_dataset / "sketches" / "photocopy" / f"{record['id']}.png", pairs / "sketches")
        shutil.copy(real_dataset / record["image"], pairs / "photos")
    out = tmp_path / "evaluation"
    result = subprocess.run([sys.executable, "-m", "dfd_model", "evaluate", "--model", str(tmp_path / "run" / "model"),
                             "--pairs", str(pairs), "--out", str(out), "--quiet"], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    for metric in ("detection_rate", "landmark_error", "sketch_f_score", "frechet_distance"):
        assert metric in result.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["counts"]["pairs"] == len(held_out) == 4
    assert 0 <= report["metrics"]["detection_rate"] <= 1 and report["metrics"]["frechet_distance"] > 0
    assert len(list((out / "faces").glob("*.png"))) == 4 and (out / "grid.jpg").is_file()


def test_generate_over_a_hostile_folder(tiny_model_folder, sample_photos, tmp_path):
    """Every unusable file gets one line naming it, every usable sketch a face, exit status 1,
    and nothing half-written is left in the output folder."""
    from tests.hostile import bad_files, write_folder

    photo = read_image(sample_photos / "astronaut.png")
    sketch = np.full((300, 200), 255, np.uint8)
    sketch[100:104, 40:160] = 0
    good = {"line sketch.png": encode_png(sketch), "été.png": encode_png(sketch.T.copy()),
            "blank.png": encode_png(np.full((64, 64), 255, np.uint8))}
    bad = {**bad_files(photo), "solid-black.png": encode_png(np.zeros((64, 64), np.uint8)),
           "photo.png": encode_png(photo)}
    folder = write_folder(tmp_path / "in", {**good, **bad})
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "dfd_model", "generate", "--model", str(tiny_model_folder),
                             str(folder), "-o", str(out), "--quiet"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    refused = {Path(line.split(":", 1)[0]).name for line in lines}
    # a flat gray photo reads as blank paper: a valid (empty) sketch
    assert refused == set(bad) - {"flat-no-face.jpg"} and len(lines) == len(refused)
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(["line sketch.png", "été.png", "blank.png", "flat-no-face.png"])
    assert all(read_image(out / name).shape == (128, 128, 3) for name in written)


def test_generate_writes_as_it_goes_and_never_over_its_inputs(tiny_model_folder, tmp_path, monkeypatch):
    """Faces are written a batch at a time (an interrupted run keeps what it finished); an
    output that cannot be written fails alone, beside the read errors; an output folder that
    would replace an input, and inputs with no image in them, are refused up front."""
    import dfd_model.generate as generate_module
    from dfd_model.generate import generate

    model = SketchToFace.from_pretrained(tiny_model_folder, "cpu")
    folder = _five_sketches(tmp_path / "in")
    (folder / "empty.png").write_bytes(b"")
    original = (folder / "a.png").read_bytes()
    with pytest.raises(UserError, match=r"a\.png: an output would replace the input"):
        generate(model, [str(folder)], folder, quiet=True)
    assert (folder / "a.png").read_bytes() == original
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="no image files in"):
        generate(model, [str(tmp_path / "nothing")], tmp_path / "out0", quiet=True)

    out = tmp_path / "out"
    (out / "b.png").mkdir(parents=True)  # b's face cannot be written there
    result = generate(model, [str(folder)], out, batch_size=2, quiet=True)
    assert sorted(p.name for p in result.written) == ["a.png", "c.png", "d.png", "e.png"]
    assert len(result.errors) == 2 and any("empty.png" in line for line in result.errors) \
        and any("b.png: cannot write" in line for line in result.errors)

    # a grid that cannot be written is one more error: the faces and the summary stand
    writer = generate_module.atomic_write_bytes

    def no_room_for_the_grid(path, data):
        if Path(path).name == "grid.jpg":
            raise UserError(f"{path}: cannot write (No space left on device)")
        writer(path, data)

    monkeypatch.setattr(generate_module, "atomic_write_bytes", no_room_for_the_grid)
    result = generate(model, [str(folder / "a.png"), str(folder / "c.png")], tmp_path / "gridless", grid=True,
                      quiet=True)
    assert len(result.written) == 2 and result.grid is None
    assert [line.endswith("grid.jpg: cannot write (No space left on device)") for line in result.errors] == [True]
    monkeypatch.setattr(generate_module, "atomic_write_bytes", writer)
    monkeypatch.setattr(generate_module, "GRID_ROWS", 1)
    result = generate(model, [str(folder / "a.png"), str(folder / "c.png")], tmp_path / "short", grid=True,
                      quiet=True)
    assert result.line(1.0).endswith(f"grid {tmp_path / 'short' / 'grid.jpg'} (the first 1)")

    _ctrl_c_at_the_fourth_sketch(monkeypatch)
    with pytest.raises(KeyboardInterrupt) as caught:  # (a caller's loop stops too)
        generate(model, [str(folder)], tmp_path / "cut", batch_size=2, quiet=True)
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["a.png", "b.png"]
    result = caught.value.result  # the run so far
    assert len(result.written) == 2 and result.not_drawn == 4  # c, d, e and empty.png

    def ctrl_c(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_module, "contact_sheet", ctrl_c)  # Ctrl-C while the grid is made
    with pytest.raises(generate_module.GenerateInterrupted) as caught:
        generate(model, [str(folder / "a.png"), str(folder / "c.png")], tmp_path / "gridcut", grid=True, quiet=True)
    assert len(caught.value.result.written) == 2 and caught.value.result.not_drawn == 0
    assert not (tmp_path / "gridcut" / "grid.jpg").exists()


def _five_sketches(folder: Path) -> Path:
    """a.png .. e.png, one stroke each, 128 px."""
    sketch = np.full((128, 128), 255, np.uint8)
    sketch[60:64, 30:100] = 0
    folder.mkdir()
    for name in "abcde":
        (folder / f"{name}.png").write_bytes(encode_png(sketch))
    return folder


def _ctrl_c_at_the_fourth_sketch(monkeypatch) -> None:
    """`generate` is interrupted (KeyboardInterrupt) as it reads its fourth sketch."""
    import dfd_model.generate as generate_module

    calls, loader = [], generate_module.load_sketch

    def interrupted(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return loader(path, *args, **kwargs)
    monkeypatch.setattr(generate_module, "load_sketch", interrupted)


def test_generate_stopped_by_ctrl_c_prints_its_summary_and_exits_130(tiny_model_folder, tmp_path, monkeypatch):
    """The command's side of the interrupted run above: the summary line, exit code 130 (the
    shell's for Ctrl-C), the first batch's faces and no grid or temporary file."""
    folder = _five_sketches(tmp_path / "in")
    _ctrl_c_at_the_fourth_sketch(monkeypatch)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_folder), str(folder), "-o", str(out),
                                       "--batch-size", "2", "--grid", "--device", "cpu", "--quiet"])
    assert result.exit_code == 130, result.output
    assert "generate: 2 faces in" in result.output and "; interrupted, 3 not drawn" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]


def test_model_commands_refuse_bad_options_and_outputs_in_one_line(tiny_model_folder, tmp_path):
    """NaN and infinite numbers, an output folder under a file or among evaluate's inputs, and
    a training run's folder given for its model: one line each, before any output is made."""
    pairs = tmp_path / "pairs"
    (pairs / "sketches").mkdir(parents=True)
    (pairs / "photos").mkdir()
    evaluate = ["evaluate", "--model", str(tiny_model_folder), "--pairs", str(pairs)]
    for option, value in (("--refine", "nan"), ("--tol", "nan"), ("--tol", "inf")):
        result = CliRunner().invoke(main, [*evaluate, "--out", str(tmp_path / "ev"), option, value])
        assert result.exit_code == 2 and f"{value}: expected a finite number" in result.output, result.output
    result = CliRunner().invoke(main, [*evaluate, "--out", str(pairs / "photos")])
    assert result.exit_code == 1 and "lies in the pairs' photos/ folder" in result.output
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "faces").symlink_to(pairs / "sketches")  # faces/ written into the sketches
    result = CliRunner().invoke(main, [*evaluate, "--out", str(tmp_path / "linked")])
    assert result.exit_code == 1 and "lies in the pairs' sketches/ folder" in result.output
    result = CliRunner().invoke(main, [*evaluate, "--out", str(tmp_path / "ev")])  # no pairs: refused, nothing made
    assert result.exit_code == 1 and "no file name appears in both" in result.output
    assert not (tmp_path / "ev").exists()

    (tmp_path / "a-file").write_text("")
    sketch = tmp_path / "sketch.png"
    sketch.write_bytes(encode_png(np.full((64, 64), 255, np.uint8)))
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_folder), str(sketch),
                                       "-o", str(tmp_path / "a-file" / "out")])
    assert result.exit_code == 1 and "Not a directory" in result.output and "Traceback" not in result.output
    run = tmp_path / "run"
    shutil.copytree(tiny_model_folder, run / "model")
    result = CliRunner().invoke(main, ["generate", "--model", str(run), str(sketch), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and f"looks like a training run: pass {run / 'model'}" in result.output
    # a gender the model lacks names those it has; a model without gender banks says so
    generate = ["generate", str(sketch), "-o", str(tmp_path / "g"), "--gender", "woman", "--model"]
    result = CliRunner().invoke(main, [*generate, str(tiny_model_folder)])
    assert result.exit_code == 2 and "'woman' is not one of the model's genders (female, male)" in result.output
    # a sketch method whose weights are missing: one line before any file, none per file
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode_png(np.full((64, 64, 3), (200, 150, 120), np.uint8)))
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_model_folder), "--from-photo", "hed", str(photo),
                                       str(photo), "-o", str(tmp_path / "h")], env={"DFD_HOME": str(tmp_path / "bare")})
    assert result.exit_code == 1 and result.output.count("HED weights not found") == 1, result.output
    assert not (tmp_path / "h").exists()
    from types import SimpleNamespace

    from dfd_model.cli import _check_gender

    with pytest.raises(click.BadParameter, match="the model's banks are not split by gender"):
        _check_gender(SimpleNamespace(genders=("all",)), "woman")  # (it had named the one bank, "all")


def _kill_test_command(dataset) -> list[str]:
    return [sys.executable, "-m", "dfd_model", "train", str(dataset), "--stage", "all", "--resolution", "128",
            "--steps", "10", "--batch-size", "2", "--log-every", "1", "--checkpoint-every", "3", "--quiet",
            *TINY_SETTINGS]


@pytest.fixture(scope="module")
def never_killed(sketched_dataset, tmp_path_factory) -> Path:
    """The run the killed ones must end equal to (one for every kill moment)."""
    run = tmp_path_factory.mktemp("never-killed") / "whole"
    whole = subprocess.run([*_kill_test_command(sketched_dataset), "--out", str(run)], capture_output=True, text=True,
                           cwd=REPO)
    assert whole.returncode == 0, whole.stderr
    return run


@pytest.mark.parametrize("seed", [1, 2])
def test_train_killed_at_a_random_moment_resumes_to_the_same_losses(sketched_dataset, never_killed, tmp_path, seed):
    """SIGKILL `dfd-model train` at a random point (maybe while it writes a checkpoint or a
    stats line), rerun it with --resume until it finishes: the losses and the saved model
    equal those of a run never interrupted."""
    import random
    import signal
    import time

    common = _kill_test_command(sketched_dataset)
    run = tmp_path / "killed"
    process = subprocess.Popen([*common, "--out", str(run)], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "stats.jsonl").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0.0, 1.5))
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # it was still training
    assert len(run_losses(run)) < 20
    resumed = subprocess.run([*common, "--out", str(run), "--resume"], capture_output=True, text=True, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert run_losses(run) == run_losses(never_killed)
    killed = SketchToFace.from_pretrained(run / "model", device="cpu").state_dict()
    expected = SketchToFace.from_pretrained(never_killed / "model", device="cpu").state_dict()
    assert all(torch.equal(killed[key], expected[key]) for key in expected)


def _full_disk_args(dataset) -> list[str]:
    return ["train", str(dataset), "--stage", "all", "--resolution", "128", "--steps", "6", "--batch-size", "2",
            "--log-every", "1", "--checkpoint-every", "2", "--quiet", *TINY_SETTINGS]


@pytest.fixture(scope="module")
def never_stopped(sketched_dataset, tmp_path_factory) -> Path:
    """The run a full disk's ones must end equal to (one for every moment the disk fills)."""
    run = tmp_path_factory.mktemp("never-stopped") / "whole"
    whole = CliRunner().invoke(main, [*_full_disk_args(sketched_dataset), "--out", str(run)])
    assert whole.exit_code == 0, whole.output
    return run


@pytest.mark.parametrize("writes_before_full", [4, 9])
def test_a_disk_that_fills_up_stops_training_with_one_line_and_resume_repeats_the_losses(
        sketched_dataset, never_stopped, tmp_path, monkeypatch, writes_before_full):
    """Every fsync after the first few fails with ENOSPC, as on a full disk: train stops with one
    line naming the file it could not write, leaves no temporary file or half checkpoint, and a
    --resume once there is space again ends with the losses and weights of a run never stopped."""
    from dfd_data.atomic import TEMP_PREFIX

    args = _full_disk_args(sketched_dataset)
    run = tmp_path / "full"
    fill_disk_after(monkeypatch, writes_before_full)
    full = CliRunner().invoke(main, [*args, "--out", str(run)])
    monkeypatch.undo()
    assert full.exit_code == 1 and "Traceback" not in full.output
    line = full.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: {run}/") and line.endswith(": cannot write (No space left on device)"), line
    assert "/.tmp-" not in line  # (the file meant, not the temporary folder written through)
    assert not [p for p in run.rglob("*") if p.name.startswith((TEMP_PREFIX, ".tmp-"))]
    resumed = CliRunner().invoke(main, [*args, "--out", str(run), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert run_losses(run) == run_losses(never_stopped)
    again = SketchToFace.from_pretrained(run / "model", device="cpu").state_dict()
    expected = SketchToFace.from_pretrained(never_stopped / "model", device="cpu").state_dict()
    assert all(torch.equal(again[key], expected[key]) for key in expected)


def test_a_batch_larger_than_the_training_set_is_said_before_training(sketched_dataset, tmp_path):
    """Batches wrap around the training set; a batch (under torchrun, the global batch) larger
    than the set repeats pairs in every step, which the printed configuration says."""
    warning = "warning: a batch is larger than the training set, so every batch repeats pairs"
    assert _trainer(sketched_dataset, tmp_path / "fits").describe().endswith("2 training pairs, 2 validation faces")
    assert _trainer(sketched_dataset, tmp_path / "repeats", batch_size=3).describe().endswith(warning)


_HOLD_THE_RUN_FOLDER = """
import sys, time
from pathlib import Path
from dfd_model.run_lock import RunFolderLock
lock = RunFolderLock(Path(sys.argv[1]), print)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


@contextlib.contextmanager
def _held_by_another_process(run: Path, seconds: float = 120):
    """A process holding `run`'s lock for the block (or `seconds`); yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_THE_RUN_FOLDER, str(run), str(seconds)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n", holder.communicate()[1]
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def _busy_line(run: Path, pid: int) -> str:
    return (f"Error: {run}: another process is training into this run folder (pid {pid} on {socket.gethostname()}); "
            "let it finish or stop it, then run this again")


def test_a_second_process_training_into_a_run_folder_is_refused_until_the_first_ends(sketched_dataset, tmp_path):
    """Two processes training into one run folder (a resume started while the run still went
    on, or torchrun processes that outlived their agent) had each removed the other's
    checkpoint in progress and written the stats twice. The second is now refused in one line
    naming the first, before it reads or says anything of the run; trainers of one process
    share the folder (a script may make a new one to resume), a trainer refused as it starts
    lets go of it, and it is free again once the first process ends, however it ends."""
    run = tmp_path / "run"
    run.mkdir()
    args = ["train", str(sketched_dataset), "--out", str(run), "--resolution", "128", "--steps", "1", "--quiet",
            *TINY_SETTINGS]
    with _held_by_another_process(run) as pid:
        refused = CliRunner().invoke(main, args)
        assert refused.exit_code == 1 and refused.output.strip().splitlines() == [_busy_line(run, pid)], refused.output
        assert sorted(path.name for path in run.iterdir()) == [".training.lock"]  # (nothing written)
    first = _trainer(sketched_dataset, run, steps=1)
    first.run("1")
    second = _trainer(sketched_dataset, run, resume=True, steps=1)  # (the same process: shared)
    first.close()
    second.close()
    with pytest.raises(TrainingError, match="already holds a training run") as refused_here:
        _trainer(sketched_dataset, run, steps=1)
    # the refused trainer, alive in the traceback, let go of the folder as it was refused
    with _held_by_another_process(run, seconds=0):
        assert refused_here.traceback  # (held until here)
    # a run held elsewhere: refused before its settings are read (a new lr had been said first)
    with _held_by_another_process(run) as pid:
        busy = CliRunner().invoke(main, ["train", str(sketched_dataset), "--out", str(run), "--resume", "--lr", "1e-4",
                                         "--quiet"])
        assert busy.exit_code == 1 and busy.output.strip().splitlines() == [_busy_line(run, pid)], busy.output

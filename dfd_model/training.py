"""Two-stage training of DeepFaceDrawing (DESIGN section 3), resumable and reproducible.

Stage 1 trains the five component auto-encoders on the sketch crops (MSE), then encodes every
training sketch into per-component feature banks (per gender when the dataset records it).
Stage 2 freezes the encoders and trains the feature decoders, the generator and the
multi-scale discriminators together on raw (unprojected) latents: LSGAN, discriminator
feature matching, a pixel L1 term, and the VGG19 perceptual loss when VGG weights are given.

A run folder holds:
    train_config.json     the resolved model and training configuration (written first)
    data/                 the training pairs stacked at the model's resolution
    stats.jsonl           losses, seconds per step and images per second, every log_every steps
    grids/                validation sheets (stage 1: sketch | reconstruction;
                          stage 2: sketch | face | photo), every grid_every steps
    checkpoints/          the newest checkpoints and latest.json (see training_checkpoint)
    model/                the SketchToFace folder (after stage 1, again after stage 2)

Batches depend only on (seed, step) and the RNG is checkpointed, so on the CPU a resumed run
repeats the losses of an uninterrupted one exactly. Under torchrun each process trains on its
share of every global batch (see dfd_model.distributed); rank 0 alone writes.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Collection

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from dfd_data.allocator import keep_freed_memory
from dfd_data.atomic import WriteError, atomic_write_bytes, atomic_write_text
from dfd_data.components import COMPONENTS
from dfd_data.contact_sheet import contact_sheet
from dfd_data.dataset import Dataset, read_jsonl
from dfd_data.devices import native_bf16, no_tf32
from dfd_data.errors import UserError
from dfd_data.image_io import encode_jpeg

from . import distributed
from .config import ModelConfig
from .losses import VGG19Features, feature_matching_loss, lsgan_loss, perceptual_loss
from .networks import MultiscaleDiscriminator, denormalize_image, fuse_feature_maps
from .projection import FeatureBank
from .run_lock import RunFolderLock
from .sketch_to_face import SketchToFace, crop_sketch_components
from .training_checkpoint import (checkpoint_configs, checkpoint_name, latest_checkpoint, load_checkpoint,
                                  save_checkpoint)
from .training_data import (BatchOrder, PairSet, TrainingDataError, UNKNOWN_GENDER, build_pair_set,
                            choose_sketch_folder, load_pair, pairs_fingerprint, split_records)

VALIDATION_FACES = 8
CONFIG_FILE = "train_config.json"
STATS_FILE = "stats.jsonl"
# Settings a resumed run may change; any other difference means a different experiment. (A
# lower lr is the way on after a loss that diverged: the optimisers take it on resuming; amp
# off the way on after fp16 gradients that kept overflowing.)
RESUMABLE_CHANGES = ("steps", "lr", "log_every", "grid_every", "checkpoint_every", "amp")


class TrainingError(UserError):
    """A run that cannot start or continue; one line."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train (model sizes live in ModelConfig).

    steps: optimisation steps per stage. l1_weight: pixel L1 between face and photo, not in
    pix2pixHD; it anchors colours early when no VGG weights are available (0 turns it off).
    vgg_weights: a safetensors file of torchvision's VGG19 (see losses.VGG19Features).
    amp: mixed precision for stage 2 where the hardware computes it natively: bf16 autocast on
    CUDA GPUs that support it and on CPUs with AMX units (1.6x faster than float32 there), fp16
    with a loss scaler on older GPUs; float32 elsewhere. Stage 1 always trains in float32: its
    narrow component networks gained no time in bf16 (0.6-1.2x on an H200, 1.0x on AMX), and
    their reconstruction loss settled higher (0.31-0.35 against 0.19-0.23 after the demo's 400
    steps).
    """

    steps: int = 50_000
    batch_size: int = 8
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    feature_matching_weight: float = 10.0
    l1_weight: float = 10.0
    vgg_weight: float = 10.0
    vgg_weights: str | None = None
    log_every: int = 50
    grid_every: int = 1000
    checkpoint_every: int = 1000
    seed: int = 0
    sketches: str | None = None
    amp: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "grid_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"training config: {name} must be a positive integer, got {value!r}")
        for name in ("lr", "beta1", "beta2", "feature_matching_weight", "l1_weight", "vgg_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"training config: {name} must be a non-negative number, got {value!r}")
        if not 0 < self.lr < 1 or not self.beta1 < 1 or not self.beta2 < 1:
            raise ValueError("training config: lr must be in (0, 1) and the betas below 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"training config: seed must be a non-negative integer, got {self.seed!r}")
        if self.amp not in (True, False):  # ("disable" had been taken as on; 1 and 0 are read as they mean)
            raise ValueError(f"training config: amp must be true or false, got {self.amp!r}")
        object.__setattr__(self, "amp", bool(self.amp))

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"training config: unknown key {unknown[0]} (known: {', '.join(sorted(names))})")
        return cls(**data)


# ---- the run folder ---------------------------------------------------------------------------------
def _run_numbers(parent: Path) -> list[int]:
    """The NNN of every parent/run-NNN folder."""
    return [int(p.name[4:]) for p in parent.glob("run-[0-9][0-9][0-9]*") if p.name[4:].isdigit()] \
        if parent.is_dir() else []


def next_run_folder(parent: Path) -> Path:
    """parent/run-NNN with the next free number."""
    return parent / f"run-{max(_run_numbers(parent), default=0) + 1:03d}"


def latest_run_folder(parent: Path) -> Path | None:
    """parent/run-NNN with the highest number, or None where there is none."""
    numbers = _run_numbers(parent)
    return parent / f"run-{max(numbers):03d}" if numbers else None


STAGE_NETS = {"autoencoders": 1, "generator": 2, "discriminator": 2}  # the stage that trains each

# fp16's loss scaler skips each step whose gradients overflow and halves its scale, while the
# losses stay finite: this many steps of the generator's or the discriminator's optimiser
# skipped in a row stop the run (the discriminator's overflows also halve the shared scale,
# until the generator's scaled gradients round to zero). A fresh scaler
# (65,536) finds its scale in fewer (about 10 for the models here); each skip halves it, so
# by then the gradients overflow at a scale 2^30 lower. A checkpoint's scale below 1 (the
# loss no longer scaled up) is not restored: the resumed run finds its scale afresh.
MAX_SKIPPED_STEPS = 30
MIN_RESTORED_LOSS_SCALE = 1.0


def _amp_context(device: torch.device, enabled: bool):
    """(autocast context factory, loss scaler or None, the compute precision's name): bf16
    where the hardware computes it natively (see native_bf16), fp16 with a loss scaler on GPUs
    without bf16, float32 elsewhere (bf16 emulated on a CPU is slower than float32)."""
    if enabled and native_bf16(device):
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None, "bf16"
    if enabled and device.type == "cuda":
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda"), "fp16"
    return contextlib.nullcontext, None, "fp32"


class AutoEncoderSet(nn.Module):
    """The five component auto-encoders as one module (one DDP wrapper for stage 1)."""

    def __init__(self, autoencoders: nn.ModuleDict):
        super().__init__()
        self.autoencoders = autoencoders

    def forward(self, crops: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.autoencoders[name](crops[name]) for name in COMPONENTS}


class FeaturesToFace(nn.Module):
    """Feature decoders, fusion and generator: latents -> (fused map, face); stage 2's G side."""

    def __init__(self, model: SketchToFace):
        super().__init__()
        self.feature_decoders, self.generator, self.config = model.feature_decoders, model.generator, model.config

    def forward(self, latents: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        maps = {name: self.feature_decoders[name](latents[name]) for name in COMPONENTS}
        fused = fuse_feature_maps(maps, self.config)
        return fused, self.generator(fused)


def _split_halves(outputs: list[list[torch.Tensor]]) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Discriminator outputs on [first; second] batches -> (outputs on first, on second)."""
    first = [[layer.chunk(2)[0] for layer in scale] for scale in outputs]
    second = [[layer.chunk(2)[1] for layer in scale] for scale in outputs]
    return first, second


def _check_nothing_trained(out: Path, resume: bool) -> None:
    """A one-line TrainingError where `out`, which holds no checkpoint, holds a trained model or,
    unless resuming (a run stopped before its first checkpoint starts again), training stats:
    a fresh start would replace them."""
    if (out / "model").exists():
        raise TrainingError(f"{out}: holds a trained model but no checkpoint to {'resume' if resume else 'continue'} "
                            "from (checkpoints/ removed?); choose another --out to train again")
    if not resume and (out / STATS_FILE).is_file() and (out / STATS_FILE).stat().st_size:
        raise TrainingError(f"{out}: already holds a training run (its {STATS_FILE}); pass --resume to start it again "
                            "from its settings, or choose another --out")


def _read_run_config(path: Path) -> dict:
    """The run's saved configuration ({"model": ..., "training": ...}), or a one-line error."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainingError(f"{path}: unreadable ({' '.join(str(error).split())}); restore it or start a new --out") \
            from None
    if not isinstance(saved, dict) or not all(isinstance(saved.get(key), dict) for key in ("model", "training")):
        raise TrainingError(f"{path}: needs a \"model\" and a \"training\" section; restore it or start a new --out")
    return saved


class Trainer:
    """One run: `Trainer(...).run(stage)`; see the module docstring for the folder it fills."""

    def __init__(self, dataset: str | Path, out: Path, model_config: ModelConfig, train_config: TrainConfig,
                 device: torch.device, *, resume: bool = False, given: Collection[str] | None = None,
                 stage: str | None = None, quiet: bool = False, echo=print):
        """`given`: the settings the user chose (the command line's explicit options); a resumed
        run keeps its own value of every other one. None: all of them. `stage`, the one `run`
        will be asked for, is checked before the data is stacked (minutes, for a large set)."""
        self._lock: RunFolderLock | None = None
        try:
            self._set_up(dataset, out, model_config, train_config, device, resume, given, stage, quiet, echo)
        except BaseException:  # (a refused run lets go of the folder at once, not when it is collected)
            if self._lock is not None:
                self._lock.release()
            raise

    def _set_up(self, dataset, out, model_config, train_config, device, resume, given, stage, quiet, echo) -> None:
        self.ranks, device = distributed.start(device)
        main = self.ranks.main
        self.dataset, self.out, self.device = Dataset(dataset), Path(out), device
        self.quiet, self.echo = quiet or not main, echo if main else (lambda line: None)
        self.model_config, self.config = self._resolve_configs(model_config, train_config, resume, given)
        distributed.main_first(self.ranks, self._check_batch_size)  # one process reports it
        torch.manual_seed(self.config.seed)
        keep_freed_memory()  # every step frees and allocates the same large activations again
        # Convolutions run fastest in channels-last layout: on CUDA with tensor cores under mixed
        # precision; on the CPU, oneDNN's NCHW kernels for few output channels (the decoders'
        # and the generator's last layers) ran at a tenth of the matmul rate or less, half as
        # fast as channels-last (a full stage 1 step went from 2.2 to 1.8 s with it).
        self.layout = torch.channels_last
        no_tf32(device)  # stage 1, and stage 2 without amp, train in float32 as TrainConfig says
        self.model = SketchToFace(self.model_config).to(device, memory_format=self.layout)
        self.discriminator = MultiscaleDiscriminator(self.model_config).to(device, memory_format=self.layout)
        self.vgg = None
        if self.config.vgg_weights:
            self.vgg = distributed.on_every_rank(self.ranks, lambda: self._load_vgg(self.config.vgg_weights))
        self.optimizers = {
            "autoencoders": self._adam(self.model.autoencoders.parameters()),
            "generator": self._adam([*self.model.feature_decoders.parameters(), *self.model.generator.parameters()]),
            "discriminator": self._adam(self.discriminator.parameters()),
        }
        self.autocast, self.scaler, self.precision = _amp_context(device, self.config.amp)
        self.stage, self.step, self.banks = 1, 0, None
        self.pending_losses: list[dict] = []  # the steps' losses since the last stats row
        self._pairs_trained_on = None
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is not None:
            state, self.banks = distributed.on_every_rank(self.ranks, lambda: load_checkpoint(
                checkpoint, modules=self._modules(), optimizers=self.optimizers, device=device))
            self.stage, self.step = state["stage"], state["step"]
            self.pending_losses = state["pending_losses"]
            self._pairs_trained_on = state.get("pairs")  # (checkpoints from before it was kept lack it)
            for optimizer in self.optimizers.values():  # the run's lr, which a resume may have lowered
                for group in optimizer.param_groups:
                    group["lr"] = self.config.lr
            if self.scaler is not None and state.get("scaler"):
                if state["scaler"].get("scale", MIN_RESTORED_LOSS_SCALE) >= MIN_RESTORED_LOSS_SCALE:
                    self.scaler.load_state_dict(state["scaler"])
                else:
                    self.echo(f"the checkpoint's fp16 loss scale ({state['scaler']['scale']:g}) is below "
                              f"{MIN_RESTORED_LOSS_SCALE:g}: the scale starts afresh")
            self.echo(f"resuming {self.out} from {checkpoint.name} (stage {self.stage}, step {self.step})")
            processes = state.get("processes", 1)  # checkpoints from before torchrun runs lack it
            was, now = state["train_config"]["batch_size"] * processes, self.config.batch_size * self.ranks.world
            if was != now:
                self.echo(f"warning: the run's global batch was {was} ({processes} processes), this one's is {now} "
                          f"({self.ranks.world}): training goes on, but not as the run would have")
            precision = state.get("precision", self.precision)  # (checkpoints from before it was kept lack it)
            amp_changed = state["train_config"].get("amp", self.config.amp) != self.config.amp  # (said above)
            if precision != self.precision and not amp_changed:  # another machine: bf16 where it had none, or the reverse
                self.echo(f"warning: the run trained stage 2 in {precision}, this machine does in {self.precision}: "
                          "training goes on, but not as the run would have")
        if stage is not None:
            distributed.main_first(self.ranks, lambda: self._check_stage(stage))
        # rank 0 stacks the pairs (a cache in the run folder); the others then read them
        data = distributed.main_first(self.ranks, self._prepare_data)
        self.pairs, self.validation = data if data is not None else self._load_data()
        if checkpoint is None and resume:
            self.echo(f"no checkpoint in {self.out}: starting at step 0")
        self._wrapped: dict[str, torch.nn.Module] = {}  # see _net

    def _load_vgg(self, path: str) -> VGG19Features:
        try:
            return VGG19Features.from_safetensors(path).to(self.device)
        except ValueError as error:
            raise TrainingError(str(error)) from None

    # ---- configuration ----------------------------------------------------------------------------
    def _resolve_configs(self, model_config, train_config, resume, given):
        """The run's configurations: rank 0 checks the dataset and the run folder and writes the
        resolved configuration, which the other processes then read (in the same folder: see
        distributed.check_shared_folder)."""
        path = self.out / CONFIG_FILE
        wanted = distributed.main_first(self.ranks, lambda: self._write_run_config(path, model_config, train_config,
                                                                                  resume, given))
        distributed.check_shared_folder(self.ranks, self.out)

        def parsed() -> tuple[ModelConfig, TrainConfig]:
            settings = wanted if wanted is not None else _read_run_config(path)
            try:
                return (ModelConfig.from_dict(settings["model"], complete=True),
                        TrainConfig.from_dict(settings["training"]))
            except (TypeError, ValueError) as error:  # a train_config.json edited by hand, or from another version
                raise TrainingError(f"{path}: {error}; restore it or start a new --out") from None

        return distributed.on_every_rank(self.ranks, parsed)  # (one line for a file every process reads)

    def _write_run_config(self, path: Path, model_config: ModelConfig, train_config: TrainConfig,
                          resume: bool, given: Collection[str] | None) -> dict:
        self.dataset.require()
        if self.out.resolve().is_relative_to(self.dataset.root.resolve()):
            raise TrainingError(f"{self.out}: the run folder must not be inside the dataset {self.dataset.root} (its "
                                "files would be taken for the dataset's); choose another --out")
        if path.is_file():  # a run: held before anything of it is read (rank 0 alone writes the folder)
            self._lock = RunFolderLock(self.out, self.echo)
        wanted = {"model": model_config.to_dict(), "training": asdict(train_config)}
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is not None and not resume:
            raise TrainingError(f"{self.out}: already holds a training run; pass --resume to continue it "
                                "or choose another --out")
        if checkpoint is None:  # a run's results without its checkpoints (removed to free room): nothing to resume
            _check_nothing_trained(self.out, resume)
        recorded, processes = checkpoint_configs(checkpoint) if checkpoint else (None, None)
        saved = _read_run_config(path) if path.is_file() else recorded
        if saved is not None and resume:
            wanted = self._resumed_config(path, saved, wanted, given, recorded, processes)
        if wanted["training"]["sketches"] is None:  # pinned: a set added later must not change the run's data
            wanted["training"]["sketches"] = choose_sketch_folder(self.dataset, None)
            if saved is not None and resume:  # a run from before the set was recorded
                self.echo(f"the run did not record its sketch set: resuming with {wanted['training']['sketches']}")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as error:
            raise TrainingError(f"{self.out}: cannot create the run folder ({error.strerror})") from None
        self._lock = self._lock or RunFolderLock(self.out, self.echo)
        atomic_write_text(path, json.dumps(wanted, indent=2, sort_keys=True) + "\n")
        return wanted

    def _resumed_config(self, path: Path, saved: dict, wanted: dict, given: Collection[str] | None,
                        recorded: dict | None, processes: int | None) -> dict:
        """The saved configuration, with the settings the user chose anew where they may change:
        the resumable ones, and any before the first checkpoint (`recorded` and `processes`, the
        configuration and the processes it records, are None: nothing was trained yet). A chosen
        setting that would make another experiment is refused. The batch is per process: on
        another number of processes, a batch size that keeps the checkpoint's global batch keeps
        the run's batches (the saved batch may be that of a resume on other processes stopped
        before its first checkpoint)."""
        differ, changed = [], []
        for section in ("model", "training"):
            for key, value in saved[section].items():
                chosen = (given is None or key in given) and not (key == "sketches" and wanted[section][key] is None)
                if not chosen or wanted[section].get(key) == value:  # (no --sketches: the set it was pinned to)
                    continue
                trained = recorded["training"]["batch_size"] * processes if key == "batch_size" and processes else None
                if trained is not None and trained == wanted[section][key] * self.ranks.world:
                    changed.append(f"batch_size {value} -> {wanted[section][key]} per process "
                                   f"(global batch {trained} on {self.ranks.world} processes)")
                    saved[section][key] = wanted[section][key]
                elif key not in RESUMABLE_CHANGES and processes is not None \
                        and not (key == "sketches" and value is None):  # (a run from before the set was recorded)
                    differ.append(f"{section}.{key} was {value!r}, given {wanted[section][key]!r}")
                else:
                    changed.append(f"{key} {value} -> {wanted[section][key]}")
                    saved[section][key] = wanted[section][key]
        if differ:
            raise TrainingError(f"{path}: the run was started with other settings ({'; '.join(differ)}); "
                                "resume with the same options or start a new --out")
        if changed:
            self.echo(f"resuming with {', '.join(changed)}")
        return saved

    def _check_batch_size(self) -> None:
        """Batch norm in training needs two values per channel, and the autoencoders' deepest maps
        are size / 32 pixels square: a 128 px model's 32 px windows leave one pixel."""
        smallest = min(self.model_config.component_sizes().values()) // 32
        if self.config.batch_size * smallest ** 2 < 2:
            per_process = " per process" if self.ranks.active else ""
            raise TrainingError(f"--batch-size {self.config.batch_size}{per_process} is too small at resolution "
                                f"{self.model_config.resolution}: the autoencoders' batch norms need 2 or more")

    def precision_of(self, stage: int) -> str:
        """The precision stage `stage`'s steps compute in: stage 1 always float32 (see
        TrainConfig.amp), stage 2 `self.precision`."""
        return self.precision if stage == 2 else "fp32"

    def describe(self) -> str:
        """The resolved configuration, printed before work starts."""
        counts = self.model_config.parameter_counts()
        total = sum(value for key, value in counts.items() if key != "discriminator")
        model = ", ".join(f"{k}={v}" for k, v in self.model_config.to_dict().items())
        training = ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())
        return (f"run folder {self.out}\nmodel: {model}\ntraining: {training}\n"
                f"parameters: {total / 1e6:.1f}M in the inference model, {counts['discriminator'] / 1e6:.1f}M in "
                f"the discriminators; device {self.device}, stage 2 in {self.precision}; {len(self.pairs)} "
                f"training pairs, {len(self.validation)} validation faces" +
                (f"; {self.ranks.world} processes, global batch {self.config.batch_size * self.ranks.world}"
                 if self.ranks.active else "") +
                ("; warning: a batch is larger than the training set, so every batch repeats pairs"
                 if self.config.batch_size * self.ranks.world > len(self.pairs) else ""))

    # ---- data ----------------------------------------------------------------------------------------
    def _prepare_data(self) -> tuple[PairSet, list[tuple[str, np.ndarray, np.ndarray]]]:
        """Rank 0's share: load (and stack) the data, then drop the stats rows a resume redoes."""
        data = self._load_data()
        self._trim_stats()
        return data

    def _load_data(self) -> tuple[PairSet, list[tuple[str, np.ndarray, np.ndarray]]]:
        sketch_folder = choose_sketch_folder(self.dataset, self.config.sketches)
        train_rows, held_out, unsketched = split_records(self.dataset, sketch_folder)
        if not train_rows:
            raise TrainingDataError(f"{self.dataset.root}: no aligned face with a {sketch_folder} sketch is in the "
                                    "training split")
        if unsketched:
            faces = "1 aligned face has" if unsketched == 1 else f"{unsketched} aligned faces have"
            self.echo(f"{faces} no {sketch_folder} sketch and {'is' if unsketched == 1 else 'are'} left out: run "
                      "dfd-data build-sketches to add them")
        resolution = self.model_config.resolution
        if self._pairs_trained_on not in (None, pairs_fingerprint(train_rows, resolution)):  # before stacking them
            raise TrainingError(f"{self.out}: was trained on other pairs than {self.dataset.root} gives now (its "
                                "faces, sketches, labels or split changed, or it is another dataset); resume with "
                                "the data it was trained on or start a new --out")
        progress = (lambda rows: rows) if self.quiet else \
            (lambda rows: tqdm(rows, desc="load pairs", unit="pair", leave=False))
        pairs, errors = build_pair_set(self.dataset, train_rows, resolution, self.out / "data", progress)
        for line in errors:
            self.echo(f"skipped: {line}")
        source = held_out or train_rows
        if not held_out:
            self.echo("no face is labelled split=val or test (dfd-data label): the validation grids show training faces")
        picks = [source[i] for i in np.linspace(0, len(source) - 1, min(VALIDATION_FACES, len(source))).round()
                 .astype(int)]
        validation = []
        for row in dict.fromkeys(map(json.dumps, picks)):
            row = json.loads(row)
            try:
                validation.append((row["id"], *load_pair(self.dataset, row, resolution)))
            except UserError as error:
                self.echo(f"skipped for the validation grid: {error}")
        if not validation:
            self.echo("no face for the validation grid could be read: training goes on without grids")
        return pairs, validation

    # ---- bookkeeping ---------------------------------------------------------------------------------
    def _net(self, name: str) -> torch.nn.Module:
        """The module `name` ("autoencoders", "generator" or "discriminator") as its stage trains
        it: under torchrun, in a DDP wrapper made when the stage first uses it, when the other
        stage's wrappers and gradients are dropped. A wrapper holds gradient buckets as large as
        its parameters (the autoencoders' 1.1 GB), which the other stage does not need; its
        gradients are views of them, not a second copy."""
        stage = STAGE_NETS[name]
        if name not in self._wrapped:
            for other in [other for other in self._wrapped if STAGE_NETS[other] != stage]:
                for parameter in self._wrapped.pop(other).parameters():
                    parameter.grad = None  # (its last step's gradients: views that would keep the buckets)
            module = {"autoencoders": lambda: AutoEncoderSet(self.model.autoencoders),
                      "generator": lambda: FeaturesToFace(self.model),
                      "discriminator": lambda: self.discriminator}[name]()
            self._wrapped[name] = distributed.wrap(module, self.ranks, self.device)
        return self._wrapped[name]

    def optimiser_steps(self, name: str) -> float:
        """The steps optimiser `name` has taken (Adam counts none for a step the loss scaler
        skipped)."""
        states = self.optimizers[name].state.values()
        return float(next(iter(states))["step"]) if states else 0.0

    def _modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, "discriminator": self.discriminator}

    def _trim_stats(self) -> None:
        """Drop stats rows written after the checkpoint we resume from (they will be redone)."""
        path = self.out / STATS_FILE
        if path.is_file():
            keep = [row for row in read_jsonl(path) if (row["stage"], row["step"]) <= (self.stage, self.step)]
            atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))

    def _checkpoint(self) -> None:
        # Batch norms' running statistics drift apart between processes as each steps on its
        # share (DDP hands rank 0's out only at the next forward pass): every process takes rank
        # 0's, which the checkpoint holds, and which stage 1's last one leaves for encoding the banks.
        for module in self._modules().values():
            distributed.broadcast_buffers(module, self.ranks)
        if not distributed.replicas_agree([self.model, self.discriminator], self.ranks, self.device):
            raise TrainingError(f"stage {self.stage} step {self.step}: the processes' parameters differ; "
                                "distributed training went out of sync")
        if not self.ranks.main:
            return
        state = {"stage": self.stage, "step": self.step, "model_config": self.model_config.to_dict(),
                 "train_config": asdict(self.config), "pending_losses": self.pending_losses,
                 "processes": self.ranks.world, "pairs": self.pairs.fingerprint, "precision": self.precision,
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        save_checkpoint(self.out, checkpoint_name(self.stage, self.step), modules=self._modules(),
                        optimizers=self.optimizers, banks=self.banks, state=state)

    def _save_model(self) -> None:
        if not self.ranks.main:
            return
        self.model.set_banks(self.banks)
        self.model.save_pretrained(self.out / "model", trained={"stage": self.stage, "step": self.step})

    def _write_grid(self) -> None:
        if not self.ranks.main or not self.validation:
            return
        sketches = torch.from_numpy(np.stack([s for _, s, _ in self.validation])).float()[:, None]
        sketches = ((sketches - 127.5) / 127.5).to(self.device)
        tiles = []
        with torch.no_grad():  # the precisions of training (see TrainConfig.amp)
            self.model.eval()
            latents = self.model.encode(sketches, refine=0.0)
            with self.autocast() if self.precision_of(self.stage) != "fp32" else contextlib.nullcontext():
                output = self.model.draw(latents) if self.stage == 1 else self.model.synthesize(latents)
            output = denormalize_image(output.float()).cpu().numpy()
        for (_, sketch, photo), result in zip(self.validation, output):
            result = result[0] if result.shape[0] == 1 else result.transpose(1, 2, 0)
            tiles += [sketch, result] + ([photo] if self.stage == 2 else [])
        columns = 2 if self.stage == 1 else 3
        sheet = contact_sheet(tiles, thumb=min(256, self.model_config.resolution), columns=columns * 2)
        atomic_write_bytes(self.out / "grids" / f"stage{self.stage}-step{self.step:07d}.jpg", encode_jpeg(sheet))

    # ---- training steps ------------------------------------------------------------------------------
    def _adam(self, parameters) -> torch.optim.Adam:
        """Adam with its fused kernel, one pass over each tensor: the full model's step is
        memory-bound, and the default implementation, a pass per arithmetic step, took 1.1 s
        per stage 1 step on this project's CPU, against 0.24 s fused (274M parameters)."""
        return torch.optim.Adam(parameters, self.config.lr, (self.config.beta1, self.config.beta2), fused=True)

    def _backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler | None = None) -> None:
        """Backward and step; through `scaler` for a loss computed in fp16 autocast."""
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
        else:
            loss.backward()
            optimizer.step()

    def stage1_step(self, sketches: torch.Tensor) -> dict[str, float]:
        self.model.autoencoders.train()
        crops = crop_sketch_components(sketches, self.model_config)
        reconstructions = self._net("autoencoders")(crops)  # float32: see TrainConfig.amp
        losses = {name: F.mse_loss(reconstructions[name], crops[name]) for name in COMPONENTS}
        total = sum(losses.values())
        self._backward_step(total, self.optimizers["autoencoders"])  # float32: no loss scaling
        return {"total": float(total.detach()), **{name: float(value.detach()) for name, value in losses.items()}}

    def stage2_step(self, sketches: torch.Tensor, photos: torch.Tensor) -> dict[str, float]:
        self.model.autoencoders.eval()
        self.model.feature_decoders.train()
        self.model.generator.train()
        self.discriminator.train()
        with torch.no_grad():  # raw latents (training never projects), float32 as the banks are
            latents = self.model.encode(sketches, refine=0.0)
        with self.autocast():
            fused, fake = self._net("generator")(latents)
            condition = fused if self.model_config.d_condition == "features" else sketches
            # As in pix2pixHD every loss comes from the same discriminator, then G steps, then D.
            # D sees fake and real in one batch (one DDP forward); for G's loss its parameters
            # are frozen, so G's backward neither fills nor synchronises D's gradients.
            both = self._net("discriminator")(torch.cat([condition.detach()] * 2),
                                                torch.cat([fake.detach(), photos]))
            pred_fake_detached, pred_real = _split_halves(both)
            self.discriminator.requires_grad_(False)
            pred_fake = self.discriminator(condition, fake)
            losses = {"g_gan": lsgan_loss(pred_fake, True),
                      "g_feat": self.config.feature_matching_weight * feature_matching_loss(pred_fake, pred_real)}
            if self.config.l1_weight:
                losses["g_l1"] = self.config.l1_weight * F.l1_loss(fake.float(), photos)
            if self.vgg is not None:
                losses["g_vgg"] = self.config.vgg_weight * perceptual_loss(self.vgg, fake.float(), photos)
            loss_g = sum(losses.values())
            loss_d = 0.5 * (lsgan_loss(pred_fake_detached, False) + lsgan_loss(pred_real, True))
        self._backward_step(loss_g, self.optimizers["generator"], self.scaler)
        self.discriminator.requires_grad_(True)
        self._backward_step(loss_d, self.optimizers["discriminator"], self.scaler)
        if self.scaler is not None:
            self.scaler.update()
        return {"g_total": float(loss_g.detach()), **{k: float(v.detach()) for k, v in losses.items()}, "d": float(loss_d.detach())}

    def build_banks(self) -> FeatureBank:
        """Encode every training sketch per component; one bank per gender when recorded."""
        self.model.autoencoders.eval()
        latents = {name: [] for name in COMPONENTS}
        rows = range(0, len(self.pairs), 32)
        with torch.no_grad():
            for start in (rows if self.quiet else tqdm(rows, desc="feature banks", unit="batch", leave=False)):
                sketches, _ = self.pairs.batch(range(start, min(start + 32, len(self.pairs))))
                for name, latent in self.model.encode(sketches.to(self.device), refine=0.0).items():
                    latents[name].append(latent.float())
        stacked = {name: torch.cat(parts) for name, parts in latents.items()}
        genders = np.array(self.pairs.genders)
        known = sorted(set(genders) - {UNKNOWN_GENDER})
        if not known:
            return FeatureBank(stacked)
        # Faces without a recorded gender are plausible for either, so they join every bank.
        return FeatureBank({name: {g: vectors[torch.from_numpy((genders == g) | (genders == UNKNOWN_GENDER))]
                                   for g in known} for name, vectors in stacked.items()})

    # ---- the loop --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Leave the process group (torchrun runs) and let go of the run folder; the trainer
        cannot be used afterwards."""
        distributed.stop(self.ranks)
        if self._lock is not None:
            self._lock.release()

    def _check_stage(self, stage: str) -> None:
        if stage == "2" and self.stage == 1:
            raise TrainingError(f"{self.out}: stage 2 needs a finished stage 1 in this run folder; run --stage 1 "
                                "(or --stage all) first")

    def run(self, stage: str) -> str:
        """Train `stage` ("1", "2" or "all") to its end; returns a one-line summary."""
        distributed.main_first(self.ranks, lambda: self._check_stage(stage))  # one process reports it
        last_stage = 1 if stage == "1" else 2
        started, summary = time.time(), []
        while self.stage <= last_stage:
            if self.step < self.config.steps:
                summary.append(self._train_stage())
            if self.stage == 1:
                # every process encodes the banks (the same ones): the others would otherwise wait
                # in the next collective for as long as rank 0 takes, past its timeout on big sets.
                # They finish minutes apart on big sets: the wait for the last is a long one.
                self.banks = self.build_banks()
                distributed.wait_for_all(self.ranks)
                self._save_model()  # before the checkpoint that leaves stage 1: a crash between them redoes both
                self.stage, self.step = 2, 0
                self._checkpoint()
                if last_stage == 1:
                    break
            else:
                self._save_model()
                break
        elapsed = time.time() - started
        distributed.barrier(self.ranks)
        return (f"train: {'; '.join(summary) or 'nothing left to do'}; {elapsed:.0f} s; model saved to "
                f"{self.out / 'model'}")

    def _train_stage(self) -> str:
        stage, timed, tick = self.stage, 0, time.time()  # steps timed since `tick` (this process's)
        pending = self.pending_losses  # kept in checkpoints: a resumed row averages the same steps
        order = BatchOrder(len(self.pairs), self.config.batch_size * self.ranks.world, self.config.seed, stream=stage)
        share = slice(self.ranks.rank * self.config.batch_size, (self.ranks.rank + 1) * self.config.batch_size)
        bar = None if self.quiet else tqdm(total=self.config.steps, initial=self.step, desc=f"stage {stage}",
                                           unit="step")
        if self.step == 0:
            self._write_grid()
        stage2_optimisers = ("generator", "discriminator")
        steps_taken = {name: self.optimiser_steps(name) for name in stage2_optimisers}
        skipped = dict.fromkeys(stage2_optimisers, 0)  # fp16 steps the loss scaler skipped in a row
        while self.step < self.config.steps:
            sketches, photos = self.pairs.batch(order.rows(self.step)[share])
            if self.device.type == "cuda":  # page-locked, so that the copies need no staging copy
                sketches, photos = sketches.pin_memory(), photos.pin_memory()
            sketches = sketches.to(self.device, non_blocking=True, memory_format=self.layout)
            photos = photos.to(self.device, non_blocking=True, memory_format=self.layout)
            losses = self.stage1_step(sketches) if stage == 1 else self.stage2_step(sketches, photos)
            losses = distributed.mean_over_ranks(losses, self.ranks, self.device)
            if not all(math.isfinite(v) for v in losses.values()):
                raise TrainingError(f"stage {stage} step {self.step + 1}: the loss became {losses}; resume from "
                                    f"the last checkpoint with a lower --lr")
            if stage == 2 and self.scaler is not None:
                for name in stage2_optimisers:
                    stepped = self.optimiser_steps(name)
                    skipped[name] = skipped[name] + 1 if stepped == steps_taken[name] else 0
                    steps_taken[name] = stepped
                    if skipped[name] == MAX_SKIPPED_STEPS:
                        raise TrainingError(f"stage 2 step {self.step + 1}: the {name}'s fp16 gradients overflowed "
                                            f"on the last {MAX_SKIPPED_STEPS} steps, so it did not train on them (loss "
                                            f"scale {self.scaler.get_scale():g}); resume from the last checkpoint with "
                                            "a lower --lr, or with --set amp=false")
            pending.append(losses)
            self.step, timed = self.step + 1, timed + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in list(losses.items())[:4]})
            end = self.step == self.config.steps
            if self.step % self.config.log_every == 0 or end:
                if self.ranks.main:
                    seconds = (time.time() - tick) / timed
                    row = {"stage": stage, "step": self.step,
                           "losses": {k: sum(d[k] for d in pending) / len(pending) for k in pending[0]},
                           "sec_per_step": round(seconds, 4),
                           "images_per_s": round(self.config.batch_size * self.ranks.world / seconds, 2),
                           "time": round(time.time(), 1),
                           **({"loss_scale": self.scaler.get_scale()} if stage == 2 and self.scaler else {})}
                    try:  # a torn line (disk full) is dropped when resuming reads the file
                        with open(self.out / STATS_FILE, "a", encoding="utf-8") as handle:
                            handle.write(json.dumps(row) + "\n")
                    except OSError as error:
                        raise WriteError.of(error, self.out / STATS_FILE) from None
                pending.clear()
                timed, tick = 0, time.time()
            if self.step % self.config.grid_every == 0 or end:
                self._write_grid()
            if self.step % self.config.checkpoint_every == 0 or end:
                self._checkpoint()
        if bar is not None:
            bar.close()
        if not self.ranks.main:
            return ""
        rows = [r for r in read_jsonl(self.out / STATS_FILE) if r["stage"] == stage]
        first, last = rows[0]["losses"], rows[-1]["losses"]
        key = "total" if stage == 1 else "g_total"
        losses = f"{first[key]:.4f} -> {last[key]:.4f}" if len(rows) > 1 else f"{last[key]:.4f} (one stats row)"
        return f"stage {stage}: {self.step} steps, loss {losses}"


__all__ = ["TrainConfig", "Trainer", "TrainingError", "next_run_folder"]

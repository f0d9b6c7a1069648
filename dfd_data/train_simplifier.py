"""Training a compact sketch simplifier on synthetic (rough, clean) pairs.

The recipe follows Simo-Serra et al. (DESIGN section 5): a per-pixel weighted MSE whose
weight map favours rare intensities in each 5x5 neighbourhood of the clean target (thin
lines on paper), random crops, scales, rotations and flips. Pairs come from
`dfd_data.rough_sketches`: crops of the user's clean sketches, if any, mixed with procedural
face-like drawings, each degraded into a rough version on the fly.

Everything random flows from `seed` (torch for the initial weights, numpy Generators for
the data), so a run is reproducible on the same machine and can resume from its checkpoint.
Outputs next to `out_path` (e.g. `simplifier.safetensors`):
- `simplifier.safetensors`: final weights, with the command, seed and settings in metadata;
- `simplifier.stats.json`: loss history, speed and held-out scores, rewritten as it goes;
- `simplifier.ckpt.safetensors`: weights + optimiser state + data RNG state while training,
  removed once the final weights are written.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import __version__
from .atomic import atomic_write_safetensors, atomic_write_text
from .devices import cpu_threads, resolve_device
from .errors import UserError
from .image_io import ImageError, is_image_name, read_image
from .line_metrics import line_scores
from .rough_sketches import RoughSketchGenerator
from .simplifier import Simplifier, save_simplifier, simplify

WEIGHT_BINS = 10
WEIGHT_WINDOW = 5
STATS_SAMPLES = 32  # rough crops used to measure the input mean/std the network normalises by


class TrainingError(UserError, ValueError):
    """A training setting or input that cannot work; str() is one line."""


# ---------------------------------------------------------------------------- loss


def loss_weights(target: torch.Tensor) -> torch.Tensor:
    """Simo-Serra's loss map for N x 1 x H x W targets in [0, 1]: exp(-H) + 0.5, where H is
    the fraction of the pixel's 5x5 neighbourhood in the same of 10 intensity bins. A line
    pixel among paper has a small H and so a large weight; without it the network learns
    that blank paper everywhere is nearly right."""
    bins = (target * WEIGHT_BINS).long().clamp_(0, WEIGHT_BINS - 1)
    onehot = F.one_hot(bins[:, 0], WEIGHT_BINS).permute(0, 3, 1, 2).to(target.dtype)
    share = F.avg_pool2d(onehot, WEIGHT_WINDOW, stride=1, padding=WEIGHT_WINDOW // 2, count_include_pad=False)
    same = (onehot * share).sum(dim=1, keepdim=True)
    return torch.exp(-same) + 0.5


def weighted_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (loss_weights(target) * (output - target) ** 2).mean()


# ---------------------------------------------------------------------------- network


class NormalisedTrainer(nn.Module):
    """Trains a Simplifier with BatchNorm after every conv but the last, sharing its convs.

    A 23-layer plain ReLU stack trained as it is sits for hundreds of steps at "all paper"
    (the weighted loss there is low, and the gradient reaching the early layers is tiny);
    Simo-Serra trained with BatchNorm too (train.lua) and shipped models without it. folded()
    merges each BatchNorm's running statistics and affine terms into the conv before it, so
    the Simplifier alone then computes what this module computes in eval mode, and the saved
    weights keep the released layout."""

    def __init__(self, model: Simplifier):
        super().__init__()
        self.model = model
        self.convs = [m for m in model if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        self.norms = nn.ModuleList(nn.BatchNorm2d(conv.out_channels) for conv in self.convs[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.model.mean) / self.model.std
        for conv, norm in zip(self.convs[:-1], self.norms):
            x = F.relu(norm(conv(x)))
        return torch.sigmoid(self.convs[-1](x))

    @torch.no_grad()
    def folded(self) -> Simplifier:
        """A copy of the Simplifier with the BatchNorms merged into its convs."""
        model = copy.deepcopy(self.model).eval()
        convs = [m for m in model if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        for conv, norm in zip(convs[:-1], self.norms):
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            # Conv2d weights are [out, in, kh, kw]; ConvTranspose2d weights [in, out, kh, kw]
            shape = (1, -1, 1, 1) if isinstance(conv, nn.ConvTranspose2d) else (-1, 1, 1, 1)
            conv.weight.mul_(scale.reshape(shape))
            conv.bias.copy_((conv.bias - norm.running_mean) * scale + norm.bias)
        return model


# ---------------------------------------------------------------------------- data


def find_clean_sketches(clean_dirs) -> list[Path]:
    """Image files under each folder (recursively), sorted so runs are reproducible. Each is
    decoded once here, so a broken file stops the run before training, not hours into it."""
    paths: list[Path] = []
    for folder in map(Path, clean_dirs):
        if not folder.is_dir():
            raise TrainingError(f"{folder}: clean-sketch folder not found")
        found = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p.name))
        if not found:
            raise TrainingError(f"{folder}: no PNG/JPG sketches in this folder")
        for path in found:
            try:
                read_image(path)
            except ImageError as error:
                raise TrainingError(f"clean sketch {error}") from None
        paths.extend(found)
    return paths


def read_sketch(path: Path) -> np.ndarray:
    """A clean sketch file as uint8 gray, 255 = paper."""
    return cv2.cvtColor(read_image(path), cv2.COLOR_RGB2GRAY)


class PairSource:
    """Draws training pairs: a clean sketch from the folders with probability
    1 - procedural_fraction, else a procedural drawing; then a random crop and degradation."""

    def __init__(self, seed, clean_paths: list[Path], procedural_fraction: float):
        self.generator = RoughSketchGenerator(seed)
        self.rng = self.generator.rng
        self.clean_paths = clean_paths
        self.procedural_fraction = 1.0 if not clean_paths else procedural_fraction

    def pair(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if self.rng.random() >= self.procedural_fraction:
            path = self.clean_paths[int(self.rng.integers(len(self.clean_paths)))]
            try:
                clean = read_sketch(path)
            except ImageError as error:
                raise TrainingError(str(error)) from None
            return self.generator.pair(clean, size)
        return self.generator.procedural_pair(size)

    def batch(self, size: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.pair(size) for _ in range(count)]
        rough = torch.from_numpy(np.stack([r for r, _ in pairs])[:, None]).float().div_(255.0)
        clean = torch.from_numpy(np.stack([c for _, c in pairs])[:, None]).float().div_(255.0)
        return rough, clean


def make_eval_pairs(seed, count: int = 16, size: int = 256, clean_paths: list[Path] = (),
                    procedural_fraction: float = 0.5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Held-out synthetic (rough, clean) pairs from their own random stream."""
    source = PairSource(seed, list(clean_paths), procedural_fraction)
    return [source.pair(size) for _ in range(count)]


def input_statistics(seed, size: int, clean_paths: list[Path], procedural_fraction: float) -> tuple[float, float]:
    """Mean of the per-image means and stds of rough inputs, as Simo-Serra normalised by."""
    source = PairSource(seed, clean_paths, procedural_fraction)
    roughs = [source.pair(size)[0].astype(np.float64) / 255.0 for _ in range(STATS_SAMPLES)]
    return float(np.mean([r.mean() for r in roughs])), float(max(np.mean([r.std() for r in roughs]), 1e-3))


# ---------------------------------------------------------------------------- evaluation


def evaluate_denoising(model: Simplifier, pairs, tol: float = 2.0, batch_size: int = 4) -> dict:
    """Line precision/recall/F-score (ink < 128, `tol` px) of the model's output against the
    clean drawing, next to the same scores for the rough input itself: the gain is what the
    simplifier adds. The F-score only sees dark ink, so the mean absolute difference from the
    clean drawing (0..255) is reported too: it also counts the light tone and texture."""
    if not pairs:
        raise ValueError("no pairs to evaluate")
    outputs = simplify(model, [rough for rough, _ in pairs], batch_size=batch_size)
    scores = {"output": [], "rough": []}
    for output, (rough, clean) in zip(outputs, pairs):
        for name, image in (("output", output), ("rough", rough)):
            row = line_scores(image, clean, tol)
            row["mae"] = float(np.abs(image.astype(np.float32) - clean).mean())
            scores[name].append(row)
    result = {"pairs": len(pairs), "tolerance_px": tol}
    for name, rows in scores.items():
        for key in ("precision", "recall", "f_score", "mae"):
            result[f"{key}_{name}"] = float(np.mean([row[key] for row in rows]))
    return result


# ---------------------------------------------------------------------------- training


def _crop_range(crop) -> tuple[int, int]:
    low, high = (crop, crop) if isinstance(crop, (int, np.integer)) else (int(crop[0]), int(crop[1]))
    if low < 32 or high < low:
        raise TrainingError(f"crop must be a size or (min, max) range of at least 32 px, got {crop}")
    if -(-low // 8) * 8 > high:  # crops are drawn in multiples of 8 inside the range
        raise TrainingError(f"crop range {low}..{high} holds no multiple of 8")
    return low, high


def _learning_rate(step: int, steps: int, lr: float) -> float:
    """Linear warm-up (deep plain ReLU stacks without normalisation start fragile), then a
    cosine decay to a tenth."""
    warmup = max(1, min(200, steps // 10))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def _paths(out_path: Path) -> tuple[Path, Path]:
    stem = out_path.name[: -len(".safetensors")] if out_path.name.endswith(".safetensors") else out_path.name
    return out_path.with_name(stem + ".ckpt.safetensors"), out_path.with_name(stem + ".stats.json")


def _save_checkpoint(path: Path, net, optimizer, state: dict) -> None:
    """Weights, Adam moments and the JSON training state (step, data RNG, history) in one
    atomically written safetensors file: no pickle, and never half-written."""
    tensors = {f"net.{key}": value for key, value in net.state_dict().items()}
    for index, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"optim.{index}.{key}"] = value
    atomic_write_safetensors(path, tensors, {"state": json.dumps(state)})


def _load_checkpoint(path: Path, net, optimizer, config: dict) -> dict:
    """Restore an interrupted run's network and Adam moments from `path`; its state (step,
    history, RNG). A checkpoint of other settings, or one that cannot be read, is one line."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            state = json.loads((handle.metadata() or {})["state"])
        if state["config"] != config:  # before the weights: another width would not even fit
            raise TrainingError(f"{path}: checkpoint was made with other settings; remove it or match them")
        tensors = load_file(str(path))
        net.load_state_dict({key[len("net."):]: value for key, value in tensors.items() if key.startswith("net.")})
    except TrainingError:
        raise
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise TrainingError(f"{path}: not a readable train-simplifier checkpoint ({type(error).__name__}); "
                            "remove it to start afresh") from None
    device = next(net.parameters()).device
    for index, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        # copies: a view would keep the file mapped for the rest of the run
        moments = {key.split(".")[2]: value.to(device, copy=True) for key, value in tensors.items()
                   if key.startswith(f"optim.{index}.")}
        if moments:
            moments["step"] = moments["step"].cpu()
            optimizer.state[param] = moments
    return state


def train_simplifier(out_path, clean_dirs=(), width: float = 0.25, steps: int = 6000, batch_size: int = 8,
                     crop=128, lr: float = 2e-3, seed: int = 0, device="auto", log_every: int = 25,
                     progress: bool = True, command: str = "", procedural_fraction: float = 0.5,
                     checkpoint_every: int = 250, eval_pairs: int = 16, resume: bool = False,
                     batch_norm: bool = True, threads: int | None = None, echo=print) -> dict:
    """Train a Simplifier of `width` for `steps` Adam steps and save it to `out_path`.

    `crop` is a square crop size or a (min, max) range (a size is drawn per step, rounded to
    a multiple of 8). The defaults (width 0.25: 2.8M parameters, an 11 MB file; 6000 steps
    of 8 crops of 128 px) take about 40 minutes on 2 idle CPU cores. `command` is the exact command line that started the run; it is stored
    in the weights' metadata with the seed and every setting. With `resume`, a checkpoint
    left by an interrupted run with the same settings is continued. `batch_norm` trains with
    BatchNorm folded into the convs at the end (see NormalisedTrainer); without it the plain
    stack is trained as it is. `threads` caps torch's CPU threads (default: all cores; use
    fewer when other jobs share the machine, as oversubscribed threads stall each other).
    `echo` takes the one-line notes (a resume with no checkpoint to resume). Returns the
    stats dict (also written to <out>.stats.json).
    """
    out_path = Path(out_path)
    low, high = _crop_range(crop)
    if steps < 1 or batch_size < 1 or log_every < 1 or checkpoint_every < 1:
        raise TrainingError("steps, batch_size, log_every and checkpoint_every must be at least 1")
    if not 0.0 <= procedural_fraction <= 1.0:
        raise TrainingError(f"procedural_fraction must be in [0, 1], got {procedural_fraction}")
    clean_paths = find_clean_sketches(clean_dirs)
    torch_device = resolve_device(device)
    ckpt_path, stats_path = _paths(out_path)
    if resume and not ckpt_path.is_file():  # (said once the arguments pass, before the run's minutes)
        echo(f"train-simplifier: no checkpoint at {ckpt_path}: starting at step 0")
    config = {"width": width, "steps": steps, "batch_size": batch_size, "crop": [low, high], "lr": lr,
              "seed": seed, "procedural_fraction": procedural_fraction if clean_paths else 1.0,
              "clean_dirs": [str(Path(d)) for d in clean_dirs], "clean_images": len(clean_paths),
              "batch_norm": batch_norm}

    train_seed, eval_seed, stats_seed = np.random.SeedSequence(seed).spawn(3)
    mean, std = input_statistics(stats_seed, high, clean_paths, procedural_fraction)
    torch.manual_seed(seed)
    model = Simplifier(width, mean, std)
    net = (NormalisedTrainer(model) if batch_norm else model).to(torch_device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    source = PairSource(train_seed, clean_paths, procedural_fraction)
    history, window, start_step, spent = [], [], 0, 0.0
    if resume and ckpt_path.is_file():
        state = _load_checkpoint(ckpt_path, net, optimizer, config)
        source.rng.bit_generator.state = state["rng"]
        start_step, history, window, spent = state["step"], state["history"], state["window"], state["seconds"]

    spent_before = spent

    def stats(step: int, final: bool = False) -> dict:
        return {"config": config, "command": command, "step": step, "seconds": round(spent, 1),
                "steps_per_second": round((step - start_step) / max(spent - spent_before, 1e-9), 3),
                "input_mean": mean, "input_std": std, "parameters": sum(p.numel() for p in model.parameters()),
                "loss_history": history, "final": final}

    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start_step, disable=not progress, desc="simplifier", unit="step")
    net.train()
    with cpu_threads(threads), bar:
        began = time.perf_counter() - spent
        for step in range(start_step, steps):
            size = int(source.rng.integers(-(-low // 8), high // 8 + 1)) * 8
            rough, clean = source.batch(size, batch_size)
            rough, clean = rough.to(torch_device), clean.to(torch_device)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, steps, lr)
            loss = weighted_mse(net(rough), clean)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {step}; lower the learning rate (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            window.append(loss.item())
            bar.update(1)
            done = step + 1
            if done % log_every == 0 or done == steps:
                spent = time.perf_counter() - began
                history.append({"step": done, "loss": float(np.mean(window)), "lr": optimizer.param_groups[0]["lr"],
                                "seconds": round(spent, 1)})
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
                window = []
            if done % checkpoint_every == 0 and done < steps:
                spent = time.perf_counter() - began
                _save_checkpoint(ckpt_path, net, optimizer, {
                    "config": config, "step": done, "history": history, "window": window, "seconds": spent,
                    "rng": source.rng.bit_generator.state})
                atomic_write_text(stats_path, json.dumps(stats(done), indent=1))
        spent = time.perf_counter() - began

    net.eval()
    model = net.folded() if batch_norm else model.eval()
    result = stats(steps, final=True)
    if eval_pairs:
        held_out = make_eval_pairs(eval_seed, eval_pairs, high, clean_paths, procedural_fraction)
        result["held_out"] = evaluate_denoising(model, held_out)
    metadata = {"command": command, "seed": seed, "steps": steps, "width": width, "batch_size": batch_size,
                "crop": [low, high], "lr": lr, "batch_norm_folded": batch_norm,
                "procedural_fraction": config["procedural_fraction"],
                "clean_dirs": config["clean_dirs"], "clean_images": len(clean_paths),
                "final_loss": history[-1]["loss"] if history else None, "train_seconds": round(spent, 1),
                "held_out": result.get("held_out"), "toolkit_version": __version__,
                "torch_version": torch.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cpus"}
    save_simplifier(model, out_path, metadata)
    atomic_write_text(stats_path, json.dumps(result, indent=1))
    ckpt_path.unlink(missing_ok=True)
    return result

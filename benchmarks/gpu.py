"""`python -m benchmarks.gpu DATASET [--json PATH] [--quick]`: the GPU path, measured and
checked on one CUDA device, in the suite's row format.

DATASET is a dataset aligned at 512 px with sketches (benchmarks/gpu_check.sh makes one).
For each network at 512 (HED, the simplifier, the full model with banks of the released
sizes): img/s of the toolkit's call beside the same layers as eager fp32 modules on the same
GPU, the network's seconds per image beside its FLOP-bound time at the GPU's measured bf16
matmul rate, and its difference from the CPU's fp32 result; the full model also beside itself
with its CUDA graphs turned off, and its encoders and bank searches beside the same with the
searches made on the host. For training at 512: seconds per step of both stages in fp32 and
of stage 2 with mixed precision (bf16, and fp16 with its loss scaler, forced), and the peak
GPU memory. A difference beyond tolerance or a non-finite loss fails the check: the command
says which and exits 1, after printing every figure.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dfd_data.dataset import Dataset
from dfd_data.devices import compute_precision, native_bf16, precision_name, prepare_for_inference
from dfd_data.image_io import read_image
from dfd_data.sketch_methods import resolve_method, run_method
from dfd_model.config import ModelConfig
from dfd_model import projection, sketch_to_face

from .measure import (RELEASED_BANKS, Row, dtype_name, eager_copy, forward_flops, matmul_flops_per_second,
                      median_seconds, random_sketches, released_size_model, synchronized, table)

CPU = torch.device("cpu")
# Mean differences from the CPU's fp32 result always allowed (the bf16 tolerances of the CPU
# tests); above them, up to twice what the CPU's own result in the device's precision differs.
HED_TOLERANCE = 0.005  # edge probability
IMAGE_TOLERANCE = 0.01 * 255  # sketch and face pixels, in levels of 255


class Checks:
    """Failed checks, collected so that every figure is printed before the exit code says so."""

    def __init__(self):
        self.failures: list[str] = []

    def agreement(self, name: str, device_result, cpu_same_precision, cpu_fp32, floor: float) -> Row:
        """Row `name`: the device's mean difference from the CPU's fp32 result, which must stay
        within `floor` or twice the rounding of the CPU in the device's precision (a wrong layout
        or device move changes the result by far more than rounding does)."""
        difference, rounding = mean_difference(device_result, cpu_fp32), mean_difference(cpu_same_precision, cpu_fp32)
        tolerance = max(floor, 2 * rounding)
        if not difference <= tolerance:
            self.failures.append(f"{name}: {difference:.4g} exceeds the tolerance {tolerance:.4g}")
        return Row(name, difference, "mean abs", "tolerance (CPU's own rounding x2, or floor)", tolerance,
                   {"cpu_rounding": rounding, "floor": floor})


def mean_difference(ours, reference) -> float:
    """Mean absolute difference over lists of arrays or tensors of equal shapes."""
    return float(np.mean([np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean()
                          for a, b in zip(ours, reference)]))


class Bench:
    """What every group needs: the device, timing with a wait for the device, the bf16 rate."""

    def __init__(self, device: torch.device, runs: int, batches: tuple[int, ...], checks: Checks):
        self.device, self.runs, self.batches, self.checks = device, runs, batches, checks
        size = 8192 if device.type == "cuda" else 2048
        self.bf16_rate = matmul_flops_per_second(torch.bfloat16, device=device, size=size)
        self.rate_row = Row("matmul_tflops_bfloat16", self.bf16_rate / 1e12, "TFLOP/s", config={"size": size})

    def seconds(self, function) -> float:
        # (two untimed calls: the full model captures its CUDA graphs on a shape's second call)
        return median_seconds(synchronized(function, self.device), self.runs, warmup=2)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.device.type == "cuda" else None

    def network_rows(self, name: str, batch: int, toolkit_call, network, eager, flops: int, config: dict) -> list[Row]:
        """img/s of the toolkit's call (upload, network, download) beside eager fp32 modules, and
        the network alone (None: the toolkit's call is the network) beside its FLOP-bound time
        at the bf16 matmul rate."""
        ours, plain = self.seconds(toolkit_call), self.seconds(eager)
        alone = ours if network is None else self.seconds(network)
        config = {**config, "batch": batch, "gflop_per_img": flops / batch / 1e9}
        return [Row(f"{name}_img_per_s_512_b{batch}", batch / ours, "img/s", "eager fp32 NCHW modules, same device",
                    batch / plain, config),
                Row(f"{name}_network_s_per_img_512_b{batch}", alone / batch, "s/img",
                    "FLOP-bound at bfloat16 matmul rate", flops / batch / self.bf16_rate, config)]


def inference(model: torch.nn.Module, device: torch.device, *args, **kwargs):
    """One call of `model` as the toolkit makes it: inference mode, the model's compute dtype."""
    with torch.inference_mode(), compute_precision(model, device):
        return model(*args, **kwargs)


def eager_call(model: torch.nn.Module, *args, **kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)


# ---- groups ----------------------------------------------------------------------------------------
def sketch_network_rows(bench: Bench, name: str, load, run, inputs: list[np.ndarray], as_batch,
                        tolerance: float) -> list[Row]:
    """Rows of one sketch network: `load(device, precision)` gives the model, `run(model,
    images, batch_size)` is the toolkit's call, `as_batch(images)` the network's NCHW input."""
    device = bench.device
    model = load(device, "auto")
    plain = eager_copy(model)
    rows = []
    for batch in bench.batches:
        x_plain = as_batch(inputs[:batch]).to(device).contiguous()
        x = x_plain.contiguous(memory_format=torch.channels_last)
        flops = forward_flops(lambda: plain(x_plain))
        rows += bench.network_rows(name, batch, lambda: run(model, inputs[:batch], batch),
                                   lambda: inference(model, device, x), lambda: eager_call(plain, x_plain), flops,
                                   {"precision": dtype_name(model.compute_dtype)})
    precision = precision_name(model.compute_dtype)
    results = [run(each, inputs[:2], 2) for each in (model, load(CPU, precision), load(CPU, "fp32"))]
    return rows + [bench.checks.agreement(f"{name}_vs_cpu_fp32", *results, tolerance)]


def hed_rows(bench: Bench, faces: list[np.ndarray]) -> list[Row]:
    from dfd_data.hed import hed_soft_edges, load_hed, to_hed_input

    return sketch_network_rows(bench, "hed", load_hed, lambda model, images, batch: hed_soft_edges(
        model, images, batch_size=batch), faces, lambda images: to_hed_input(np.stack(images)), HED_TOLERANCE)


def simplifier_rows(bench: Bench, faces: list[np.ndarray]) -> list[Row]:
    from dfd_data.simplifier import default_simplifier_path, load_simplifier, simplify

    sketches = run_method(resolve_method("photocopy"), faces, "cpu", len(faces))
    return sketch_network_rows(
        bench, "simplify", lambda device, precision: load_simplifier(default_simplifier_path(), device, precision),
        lambda model, images, batch: simplify(model, images, batch_size=batch), sketches,
        lambda images: torch.from_numpy(np.stack(images)[:, None]).float() / 255, IMAGE_TOLERANCE)


def generation_rows(bench: Bench) -> list[Row]:
    """Sketch -> face at 512 with banks of the released sizes (random weights: the time does
    not depend on their values), its peak device memory, and a check against the CPU in fp32."""
    device, config = bench.device, ModelConfig()
    model = prepare_for_inference(released_size_model(config), device)
    plain = eager_copy(released_size_model(config)).to(device)  # as built: no folded norms, no bf16 rounding
    sketches = random_sketches(max(bench.batches), config.resolution)
    rows = []
    for batch in bench.batches:
        sketch = sketches[:batch]
        flops = forward_flops(lambda: plain(sketch, gender="female"))
        bench.reset_peak()
        rows += bench.network_rows("generate", batch, lambda: inference(model, device, sketch, gender="female"),
                                   None, lambda: eager_call(plain, sketch, gender="female"), flops,
                                   {"precision": dtype_name(model.compute_dtype), "banks": RELEASED_BANKS})
        rows[-1].config["peak_gib_both_models"] = bench.peak_gib()
        if device.type == "cuda":
            model.use_cuda_graphs = False
            eager = bench.seconds(lambda: inference(model, device, sketch, gender="female"))
            model.use_cuda_graphs = True
            rows.append(Row(f"generate_cuda_graphs_img_per_s_512_b{batch}", rows[-2].value, "img/s",
                            "the same model launching its kernels one by one", batch / eager, {"batch": batch}))
            rows.append(search_row(bench, model, sketch))
    # The same weights on the CPU in fp32, without projection (whose neighbours may swap on ties).
    precision = precision_name(model.compute_dtype)
    results = [inference(model, device, sketches[:1], refine=0.0).float().cpu() * 127.5]  # levels of 255
    cpu_model = plain.cpu()  # the same weights
    for cpu_precision in (precision, "fp32"):
        prepared = prepare_for_inference(copy.deepcopy(cpu_model), CPU, cpu_precision)
        results.append(inference(prepared, CPU, sketches[:1], refine=0.0).float() * 127.5)
    return rows + [bench.checks.agreement("generate_vs_cpu_fp32", *results, IMAGE_TOLERANCE)]


def search_row(bench: Bench, model, sketch: torch.Tensor) -> Row:
    """Encoding a batch with every component's bank search, as the model makes them (on the
    device, replayed with the encoders as one CUDA graph), beside the same encoders with the
    searches made on the host (scores and candidates read back, re-ranked and solved in numpy)."""
    def encode():
        with torch.inference_mode():
            return model.encode(sketch, gender="female")

    on_device = bench.seconds(encode)
    with mock.patch.object(sketch_to_face, "searches_on_device", lambda device: False), \
            mock.patch.object(projection, "_computed_on_device", lambda query, bank: False):
        on_host = bench.seconds(encode)
    return Row(f"encode_and_search_ms_512_b{sketch.shape[0]}", on_device * 1000, "ms",
               "the searches made on the host", on_host * 1000, {"banks": RELEASED_BANKS})


def training_rows(bench: Bench, dataset: Path, batch: int) -> list[Row]:
    """Seconds per step of both stages at 512 in fp32 (beside the FLOP-bound time of their
    forward and backward passes), then of stage 2 in each mixed precision the device offers
    (beside fp32): stage 1 always trains in fp32 (see TrainConfig.amp)."""
    precisions = ["fp32"]
    if bench.device.type == "cuda":
        precisions += (["bf16"] if native_bf16(bench.device) else []) + ["fp16"]
    fp32_seconds: dict[int, float] = {}
    rows = []
    for precision in precisions:
        # fp16 is what a GPU without bf16 gets; force it to run its loss-scaler path here.
        forced = mock.patch.object(torch.cuda, "is_bf16_supported", return_value=False) if precision == "fp16" \
            else contextlib.nullcontext()
        with tempfile.TemporaryDirectory(prefix="dfd-gpu-") as out, forced:
            rows += _training_steps(bench, dataset, Path(out), batch, precision, fp32_seconds)
    return rows


def _training_steps(bench: Bench, dataset: Path, out: Path, batch: int, precision: str,
                    fp32_seconds: dict[int, float]) -> list[Row]:
    """One trainer's rows (it is freed on return, before the next precision's is built)."""
    from dfd_model.training import MAX_SKIPPED_STEPS, TrainConfig, Trainer

    device = bench.device
    trainer = Trainer(dataset, out, ModelConfig(), TrainConfig(batch_size=batch, steps=10, amp=precision != "fp32"),
                      device, quiet=True, echo=lambda line: None)
    sketches, photos = trainer.pairs.batch(np.arange(batch) % len(trainer.pairs))
    sketches = sketches.to(device, memory_format=trainer.layout)
    photos = photos.to(device, memory_format=trainer.layout)
    steps = {1: lambda: trainer.stage1_step(sketches), 2: lambda: trainer.stage2_step(sketches, photos)}
    steps = {stage: step for stage, step in steps.items() if trainer.precision_of(stage) == precision}
    if 2 in steps and trainer.scaler is not None:  # a fresh fp16 scaler skips its first steps while it finds its scale
        for _ in range(MAX_SKIPPED_STEPS):
            if trainer.optimiser_steps("generator"):
                break
            steps[2]()
    warmed_up = trainer.optimiser_steps("generator")
    rows = []
    for stage, step in steps.items():
        losses: list[dict[str, float]] = []
        bench.reset_peak()
        seconds = bench.seconds(lambda: losses.append(step()))
        config = {"batch": batch, "precision": precision, "peak_gib": bench.peak_gib(), "losses": losses[-1]}
        if not all(math.isfinite(value) for step_losses in losses for value in step_losses.values()):
            bench.checks.failures.append(f"train stage {stage} {precision}: a loss is not finite: {losses}")
        name = f"train_stage{stage}_s_per_step_512_{precision}"
        if precision == "fp32":
            with FlopCounterMode(display=False) as counter:
                step()
            fp32_seconds[stage] = seconds
            rows.append(Row(name, seconds, "s", "FLOP-bound at bfloat16 matmul rate",
                            counter.get_total_flops() / bench.bf16_rate, config))
        else:
            rows.append(Row(name, seconds, "s", "fp32 steps, same device", fp32_seconds[stage], config))
    if trainer.scaler is not None and not math.isfinite(trainer.scaler.get_scale()):
        bench.checks.failures.append(f"train {precision}: the loss scale is {trainer.scaler.get_scale()}")
    if 2 in steps and trainer.optimiser_steps("generator") == warmed_up:  # (fp16 skips overflowing steps)
        bench.checks.failures.append(f"train stage 2 {precision}: the generator's optimiser took none of the timed steps")
    trainer.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="a dataset aligned at 512 px with sketches")
    parser.add_argument("--device", default="cuda", help="cuda (the default), or cpu to try the script without a GPU")
    parser.add_argument("--quick", action="store_true", help="batch 1 only, one timed run, training batch 1")
    parser.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: torch sees no CUDA device; nothing to measure here")
    dataset = Dataset(args.dataset)
    records = dataset.aligned()
    if not records:
        raise SystemExit(f"{args.dataset}: no aligned faces")
    batches = (1,) if args.quick else (1, 16)
    faces = [read_image(dataset.path(record["image"])) for record in records[:max(batches)]]
    faces = (faces * max(batches))[:max(batches)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; {'quick' if args.quick else 'full'} run", flush=True)
    started, checks = time.time(), Checks()
    bench = Bench(device, 1 if args.quick else 5, batches, checks)
    rows = [bench.rate_row]
    groups = {"hed": lambda: hed_rows(bench, faces), "simplify": lambda: simplifier_rows(bench, faces),
              "generate": lambda: generation_rows(bench),
              "train": lambda: training_rows(bench, args.dataset, 1 if args.quick else 4)}
    for group, measure in groups.items():
        print(f"... {group}", file=sys.stderr, flush=True)
        rows += measure()
    print(table(rows))
    print(f"{len(rows)} figures in {time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": name, "torch": torch.__version__, "quick": args.quick,
                       "rows": [row.as_dict() for row in rows]}, handle, indent=1)
    for failure in checks.failures:
        print(f"FAILED {failure}")
    return 1 if checks.failures else 0


if __name__ == "__main__":
    sys.exit(main())

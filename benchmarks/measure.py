"""Shared measuring tools of the benchmark suite: warm median timings, the machine's matmul
throughput (what "FLOP-bound" divides by), FLOP counts of a forward pass, peak memory, and
the row every figure is reported as."""
from __future__ import annotations

import copy
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

MATMUL_SIZE = 2048
# Latents per component in the released model's banks (female, male): 17,703 in all.
RELEASED_BANKS = {"female": 11_456, "male": 6_247}


@dataclass
class Row:
    """One figure beside its baseline, measured in the same run (the JSON row format)."""

    name: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    config: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def dtype_name(dtype: torch.dtype) -> str:
    """"float32", "bfloat16": how rows and configs name a dtype."""
    return str(dtype).removeprefix("torch.")


def median_seconds(function: Callable[[], object], runs: int, warmup: int = 1) -> float:
    """Median wall time of `runs` calls after `warmup` untimed ones (first-call allocations,
    kernel selection and caches are not what a long batch pays)."""
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def interleaved_medians(functions: Sequence[Callable[[], object]], runs: int, warmup: int = 1) -> list[float]:
    """Median wall time of each function, calling them in turn `runs` times after `warmup`
    rounds: figures divided by each other saw the same machine load (a shared VM's speed
    drifts by a third within a minute, so a rate measured at another moment skews a ratio)."""
    for _ in range(warmup):
        for function in functions:
            function()
    samples: list[list[float]] = [[] for _ in functions]
    for _ in range(runs):
        for function, times in zip(functions, samples):
            started = time.perf_counter()
            function()
            times.append(time.perf_counter() - started)
    return [statistics.median(times) for times in samples]


def synchronized(function: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """`function` followed by a wait for the device, so that wall time covers its CUDA work."""
    if device.type != "cuda":
        return function

    def call():
        function()
        torch.cuda.synchronize(device)
    return call


def matmul_product(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   size: int = MATMUL_SIZE) -> Callable[[], None]:
    """One size x size matrix product on `device` (the CPU with torch's threads), as a call to
    time; it does 2 * size**3 FLOPs."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    return synchronized(lambda: a @ b, device)


def matmul_flops_per_second(dtype: torch.dtype = torch.float32, runs: int = 5, device: str | torch.device = "cpu",
                            size: int = MATMUL_SIZE) -> float:
    """FLOP/s of a size x size matrix product on `device`, the best of three medians."""
    product = matmul_product(dtype, device, size)
    seconds = min(median_seconds(product, runs, warmup=2) for _ in range(3))
    return 2 * size ** 3 / seconds


def eager_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same layers and weights as plain modules: NCHW, fp32, no autocast, and the fused and
    Winograd convolutions and pair max pools of the inference rewrite as the plain layers they
    stand for. (A model prepared for inference keeps its folded batch norms and its weights'
    rounding to bf16 where they were cast.)"""
    from dfd_data.inference_graph import ConvActivation, PairMaxPool
    from dfd_data.winograd import WinogradConv3x3

    plain = copy.deepcopy(model)
    for parent in list(plain.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (ConvActivation, WinogradConv3x3)):
                setattr(parent, name, child.as_layers())
            elif isinstance(child, PairMaxPool):
                setattr(parent, name, torch.nn.MaxPool2d(2, 2, ceil_mode=child.ceil_mode))
    plain = plain.to(memory_format=torch.contiguous_format).float().eval()
    plain.compute_dtype = torch.float32
    return plain


def forward_flops(function: Callable[[], object]) -> int:
    """FLOPs torch counts for one call of plain layers (convolutions and matrix products as
    direct computation does them; element-wise work is not counted)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        function()
    return counter.get_total_flops()


def winograd_flops_saved(model: torch.nn.Module, function: Callable[[], object]) -> int:
    """The FLOPs that `model`'s Winograd layers do not compute in one call of `function`, of
    those forward_flops counts for the same layers as direct convolutions: F(2x2, 3x3) takes
    16 products per 2x2 output tile and channel pair where direct convolution takes 36. A bound
    from the nominal count alone credits the algorithm's savings as speed."""
    from dfd_data.winograd import WinogradConv3x3

    saved = 0

    def count(layer, inputs, output) -> None:
        nonlocal saved
        if output.ndim == 4:  # (an unbatched call comes back through the batched one)
            height, width = output.shape[-2:]
            tiles = -(-height // 2) * -(-width // 2)
            saved += 2 * output.shape[0] * layer.in_channels * layer.out_channels * (9 * height * width - 16 * tiles)

    hooks = [layer.register_forward_hook(count) for layer in model.modules() if isinstance(layer, WinogradConv3x3)]
    try:
        with torch.inference_mode():
            function()
    finally:
        for hook in hooks:
            hook.remove()
    return saved


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh in a spawned child,
    where getrusage's maximum is inherited from the parent across exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.machine())


def released_size_banks(latent_dim: int, seed: int = 1):
    """Random feature banks of the released sizes for every component: the search costs what
    the real banks cost, whatever the values."""
    from dfd_data.components import COMPONENTS
    from dfd_model.projection import FeatureBank

    generator = torch.Generator().manual_seed(seed)
    return FeatureBank({name: {gender: torch.randn(count, latent_dim, generator=generator)
                               for gender, count in RELEASED_BANKS.items()} for name in COMPONENTS})



def released_size_model(config):
    """SketchToFace with random weights (seed 0) and random banks of the released sizes, as
    built (not prepared for inference): every call builds the same model, so a prepared copy
    and a plain one can be timed side by side."""
    from dfd_model.sketch_to_face import SketchToFace

    torch.manual_seed(0)
    return SketchToFace(config, released_size_banks(config.latent_dim))


def random_sketches(count: int, resolution: int) -> torch.Tensor:
    """uint8 [count, R, R]: paper with 3% ink (seed 1), the input generation is timed on."""
    generator = torch.Generator().manual_seed(1)
    sketches = torch.full((count, resolution, resolution), 255, dtype=torch.uint8)
    sketches[torch.rand(sketches.shape, generator=generator) < 0.03] = 0
    return sketches


def format_value(value: float) -> str:
    return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"


def table(rows: list[Row]) -> str:
    """name | value | baseline | baseline value | ours vs baseline (x faster when > 1)."""
    lines = [f"{'name':44s} {'value':>10s} {'unit':8s} {'baseline':36s} {'baseline':>10s} {'ours vs base':>12s}"]
    for row in rows:
        base = format_value(row.baseline_value) if row.baseline_value else ""
        comparison = ""
        if row.baseline_value and row.value:  # (a difference of exactly 0 has no ratio)
            faster = row.value / row.baseline_value if row.unit.endswith("/s") else row.baseline_value / row.value
            comparison = f"{faster:11.2f}x"
        lines.append(f"{row.name:44s} {format_value(row.value):>10s} {row.unit:8s} {(row.baseline or '')[:36]:36s} "
                     f"{base:>10s} {comparison:>12s}")
    return "\n".join(lines)

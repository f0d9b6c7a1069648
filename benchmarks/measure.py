"""Shared measuring tools of the benchmark suite: warm median timings, the machine's matmul
throughput (what "FLOP-bound" divides by), FLOP counts of a forward pass, peak memory, and
the row every figure is reported as."""
from __future__ import annotations

import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

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


def matmul_flops_per_second(dtype: torch.dtype = torch.float32, runs: int = 5) -> float:
    """FLOP/s of a 2048x2048 matrix product on this machine's CPU (torch's threads)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator).to(dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator).to(dtype)
    seconds = min(median_seconds(lambda: a @ b, runs, warmup=2) for _ in range(3))
    return 2 * MATMUL_SIZE ** 3 / seconds


def forward_flops(function: Callable[[], object]) -> int:
    """FLOPs torch counts for one call (convolutions and matrix products; element-wise work
    is not counted, so the bound it gives is a true lower bound)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        function()
    return counter.get_total_flops()


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

"""Manifold projection latency per component versus bank size, beside a brute-force baseline.

For banks of 1,000, 17,703 (the released model's female + male vectors) and 100,000 random
512-d latents, times `dfd_model.projection.project` (K = 10, anchored weights; matrix-product
search with cached squared norms and exact re-ranking) for one query, warm, and the same
search done by brute force in numpy (all distances, argsort), as in a straightforward port.

    python benchmarks/projection_speed.py [--runs 50] [--threads N]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from dfd_model.projection import FeatureBank, project

SIZES = (1_000, 17_703, 100_000)


def timed(function, runs: int) -> float:
    function()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; one 512-d query, "
          f"K = 10, median of {args.runs} warm runs")
    print(f"{'bank vectors':>12s} {'project ms':>11s} {'numpy brute-force ms':>21s} {'speed-up':>9s}")
    generator = torch.Generator().manual_seed(0)
    for size in SIZES:
        bank = torch.randn(size, 512, generator=generator)
        banks = FeatureBank({"nose": bank})
        norms = banks.squared_norms("nose")
        query = torch.randn(1, 512, generator=generator)
        ours = timed(lambda: project(query, bank, 10, bank_squared_norms=norms), args.runs)
        bank_np, query_np = bank.numpy(), query.numpy()[0]
        brute = timed(lambda: np.argsort(((bank_np - query_np) ** 2).sum(1))[:10], max(5, args.runs // 5))
        print(f"{size:12,d} {ours:11.2f} {brute:21.2f} {brute / ours:8.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

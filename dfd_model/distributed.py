"""Multi-process training under torchrun: process group, device per rank, gradient sync.

`dfd-model train` runs unchanged as `torchrun --nproc-per-node N -m dfd_model train ...`:
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) starts a process group (nccl on CUDA,
gloo on CPU), each process takes its share of every global batch, DistributedDataParallel
averages the gradients, and rank 0 alone prints, writes grids, stats and checkpoints. Without
torchrun everything here is a no-op for a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import distributed as dist
from torch import nn


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def start(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group if there is one; returns the ranks and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks, device


def stop(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()


def wrap(module: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `module` when several processes train, else `module`."""
    if not ranks.active:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def mean_over_ranks(values: dict[str, float], ranks: Ranks, device: torch.device) -> dict[str, float]:
    """Average logged losses over the processes, so rank 0 reports the global batch."""
    if not ranks.active:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / ranks.world).tolist()))


def parameters_agree(modules: list[nn.Module], ranks: Ranks, device: torch.device) -> bool:
    """True when every process holds the same parameters (checked at each checkpoint)."""
    if not ranks.active:
        return True
    digest = torch.stack([p.detach().double().sum() + (p.detach().double() ** 2).sum()
                          for module in modules for p in module.parameters()]).to(device)
    gathered = [torch.empty_like(digest) for _ in range(ranks.world)]
    dist.all_gather(gathered, digest)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


__all__ = ["Ranks", "barrier", "mean_over_ranks", "parameters_agree", "start", "stop", "unwrap", "wrap"]

"""Where and how the computation runs.

Device choice, the autocast dtype, seeding, peak memory; and the torchrun side: the process
group, a rank's shard of a list, gathering shards back in order, and barriers.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for but CUDA is not available; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device mps was asked for but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def autocast_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """The dtype AMP runs in, or None when AMP is off. Default: on for CUDA only."""
    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return None
    # Native bf16 from Ampere (compute capability 8) on; older cards (T4, V100) only emulate it, slowly.
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16  # needs a GradScaler
    return torch.bfloat16


def use_channels_last(device: torch.device) -> bool:
    """channels_last memory format: faster convolutions on CUDA; elsewhere the default layout."""
    return device.type == "cuda"


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; peak process RSS elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a torchrun job; one process without torchrun."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = DistributedContext()  # a plain run, without torchrun


def init_distributed(device_name: str) -> tuple[DistributedContext, torch.device]:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size <= 1:
        return DistributedContext(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(torch.distributed.get_rank(), world_size), device


def barrier(dist: DistributedContext) -> None:
    if dist.active:
        torch.distributed.barrier()


class main_process_first:
    """Rank 0 runs the block first (scans data, builds caches); the others then find its files."""

    def __init__(self, dist: DistributedContext):
        self.dist = dist

    def __enter__(self):
        if not self.dist.is_main:
            barrier(self.dist)

    def __exit__(self, *exc):
        if self.dist.is_main and exc[0] is None:
            barrier(self.dist)
        return False


def shard(items: list, dist: DistributedContext) -> list:
    """This rank's share: padded (like DistributedSampler) to a multiple of the world size, strided."""
    if not dist.active:
        return items
    padded = items + items[: (-len(items)) % dist.world_size]
    return padded[dist.rank :: dist.world_size]


def gather_shards(tensor: torch.Tensor, dist: DistributedContext, total: int) -> torch.Tensor:
    """Undo `shard`: every rank's equally long part, back in the original order, padding dropped."""
    if not dist.active:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.world_size)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.stack(parts, dim=1).flatten(0, 1)[:total]


def broadcast_buffers(model: nn.Module, dist: DistributedContext) -> None:
    """Give every rank rank 0's BatchNorm running statistics: each rank updated its own copy with
    its last local batch, and evaluation must use the weights the checkpoint holds."""
    if dist.active:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def all_reduce_sum(tensor: torch.Tensor, dist: DistributedContext) -> torch.Tensor:
    if dist.active:
        torch.distributed.all_reduce(tensor)
    return tensor


class ShardOrder(torch.utils.data.Sampler[tuple[int, int]]):
    """Evaluation order: this rank's shard of 0..n-1, as (index, seed) pairs like EpochSampler's."""

    def __init__(self, count: int, dist: DistributedContext):
        self.order = [(i, 0) for i in shard(list(range(count)), dist)]

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

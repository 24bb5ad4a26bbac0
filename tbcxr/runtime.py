"""Where and how the computation runs.

Device choice, the autocast dtype, exact float32 for evaluation, seeding, peak memory; and the
torchrun side: the process group and its timeout, a rank's shard of a list, gathering shards back
in order, and barriers; holding Ctrl-C over writes that must not be cut.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
from torch import nn

from .errors import ConfigurationError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(
            "error: --device cuda was asked for but CUDA is not available; use --device cpu or auto"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigurationError("error: --device mps was asked for but MPS is not available; use --device cpu or auto")
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


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on the device in the memory format training uses there: every evaluation of a checkpoint
    (at the end of training, --test-only, --compare) computes in the same layout."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if use_channels_last(device) else model


def _precision_settings() -> tuple[list[tuple[object, str]], object]:
    """The (owner, attribute) pairs of the float32 precision flags for convolutions and matrix products, and the
    value that makes them exact; cuDNN's autotuner flag last."""
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9: the per-backend precision settings
        settings = [(torch.backends.cudnn.conv, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")]
        exact = "ieee"
    else:
        settings = [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]
        exact = False
    # cuDNN's autotuner may pick another algorithm per batch shape: the same image could score differently.
    return [*settings, (torch.backends.cudnn, "benchmark")], exact


def set_exact_float32() -> None:
    """Convolutions and matrix products in full float32 from now on, for the whole process.

    CUDA convolutions use TF32 (10 bits of mantissa) by default from Ampere on: the same weights would then
    score an image differently from one evaluation to the next (other batches, other kernels) by far more
    than float32 rounding, enough to move it across a threshold. A process that only scores (the model
    server, whose requests run in threads side by side) sets this once: flags saved and restored around each
    batch would let one thread's restore switch TF32 back on under another's forward pass."""
    settings, exact = _precision_settings()
    for owner, name in settings[:2]:
        setattr(owner, name, exact)
    torch.backends.cudnn.benchmark = False


@contextmanager
def ieee_float32():
    """set_exact_float32 inside the block, the flags restored after: for one thread that also trains (training
    keeps TF32's speed). Never in threads that score side by side: use set_exact_float32 there."""
    settings, _ = _precision_settings()
    saved = [getattr(owner, name) for owner, name in settings]
    set_exact_float32()
    try:
        yield
    finally:
        for (owner, name), value in zip(settings, saved):
            setattr(owner, name, value)


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
TIMEOUT_VARIABLE = "TB_DIST_TIMEOUT_MINUTES"
# The other ranks wait in a barrier while rank 0 scans, leak-checks and caches the data: a first run on
# 50,000 images (or slow JPEG 2000 DICOMs) takes far longer than NCCL's default of 10 minutes.
DEFAULT_TIMEOUT_MINUTES = 120.0


def process_group_timeout() -> timedelta:
    """How long a rank waits in a collective before the job fails: TB_DIST_TIMEOUT_MINUTES, else 2 hours."""
    text = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        minutes = float(text) if text else DEFAULT_TIMEOUT_MINUTES
    except ValueError:
        minutes = float("nan")
    if not minutes > 0:
        raise ConfigurationError(
            f"error: {TIMEOUT_VARIABLE}={text!r}: give the timeout as a positive number of minutes"
        )
    return timedelta(minutes=minutes)


def init_distributed(device_name: str) -> tuple[DistributedContext, torch.device]:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size <= 1:
        return DistributedContext(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=process_group_timeout())
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
            try:
                barrier(self.dist)
            except RuntimeError as exc:  # gloo raises on a timeout; NCCL's watchdog ends the process instead
                minutes = process_group_timeout().total_seconds() / 60
                raise ConfigurationError(
                    f"error: rank {self.dist.rank} stopped waiting for rank 0's data preparation: it took longer "
                    f"than the process group timeout ({minutes:g} min; set {TIMEOUT_VARIABLE} for a longer one), "
                    f"or rank 0 failed ({exc})"
                ) from exc

    def __exit__(self, *exc):
        if self.dist.is_main and exc[0] is None:
            barrier(self.dist)
        return False


def shard(items: list, dist: DistributedContext) -> list:
    """This rank's share: padded to a multiple of the world size by repeating the list from its start
    (cycling, so that 2 items fill 8 ranks too: every rank gets equally many), strided."""
    if not dist.active or not items:
        return items
    padded = [items[i % len(items)] for i in range(-(-len(items) // dist.world_size) * dist.world_size)]
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


@contextmanager
def ctrl_c_held():
    """Hold Ctrl-C until the block has run, then raise it. Writes that must not be cut run inside: a
    KeyboardInterrupt inside a sqlite write leaves the database locked (the run could not then be marked
    KILLED), and one inside torch.save reaches the caller as a RuntimeError from its C++ writer."""
    previous = signal.getsignal(signal.SIGINT)
    # Handlers are set on the main thread only; and an ignored (nohup), held or foreign handler stays as it is.
    if threading.current_thread() is not threading.main_thread() or previous is not signal.default_int_handler:
        yield
        return
    pressed = []
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pressed:
            raise KeyboardInterrupt

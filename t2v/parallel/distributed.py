"""Process groups and data-parallel wrapping for multi-process training.

Launch with `torchrun` (or the `deepspeed` launcher, SLURM via scripts/slurm_train.sh); the process group
comes from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):
gloo on CPU, nccl on CUDA, with a timeout of T2V_DIST_TIMEOUT_MINUTES (default 30).

An entry point joins once, `init_distributed(cfg.distributed.sequence_parallel_size)`, before it builds
its task; everything after only reads the layout (`rank_and_world`, `data_parallel_info`).

Sequence parallelism of size P: ranks form groups of P consecutive ranks that read the same batch and
split its tokens (t2v.parallel.sequence); data is sharded over the world // P data-parallel groups,
`data_parallel_info()` = (rank // P, world // P).

The model itself stays single-device; `parallelize(model, cfg)` applies distribution afterwards.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from t2v.config import DistributedConfig

DEFAULT_TIMEOUT_MINUTES = 30.0

# Set once per process by the first `init_distributed` under a launcher: P and this rank's group of P.
_sequence_parallel: dict = {}


def launched_by_torchrun() -> bool:
    """True when the launcher's environment (WORLD_SIZE, RANK) is present."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def timeout_minutes() -> float:
    value = os.environ.get("T2V_DIST_TIMEOUT_MINUTES", str(DEFAULT_TIMEOUT_MINUTES))
    try:
        minutes = float(value)
    except ValueError:
        raise ValueError(f"T2V_DIST_TIMEOUT_MINUTES={value!r} must be a number of minutes") from None
    if minutes <= 0:
        raise ValueError(f"T2V_DIST_TIMEOUT_MINUTES={value!r} must be > 0")
    return minutes


def init_distributed(sequence_parallel_size: int = 1, timeout: datetime.timedelta | None = None) -> tuple[int, int]:
    """Join the launcher's process group and make the sequence-parallel groups; returns (rank, world_size).

    Call it once per process, before building anything that shards data (a no-op without a launcher).
    Sets the CUDA device to LOCAL_RANK before the group is made, so nccl binds one GPU per process.
    `timeout` defaults to T2V_DIST_TIMEOUT_MINUTES. Joining again with the same P returns the same answer;
    with another P it is an error, since data may already be sharded by the first layout.
    """
    if not dist.is_available() or not launched_by_torchrun():
        if sequence_parallel_size > 1:
            raise ValueError(f"distributed.sequence_parallel_size={sequence_parallel_size} needs a launch on a "
                             "multiple of that many processes (torchrun); this is one process")
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timeout or datetime.timedelta(minutes=timeout_minutes()))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if not _sequence_parallel:
        _make_sequence_groups(sequence_parallel_size, rank, world_size)
        _sequence_parallel["size"] = sequence_parallel_size
    elif sequence_parallel_size != _sequence_parallel["size"]:
        raise ValueError(
            f"distributed.sequence_parallel_size={sequence_parallel_size}, but this process already joined with "
            f"size {_sequence_parallel['size']}"
        )
    return rank, world_size


def _make_sequence_groups(size: int, rank: int, world_size: int) -> None:
    """Groups of `size` consecutive ranks; every rank creates every group (new_group is collective)."""
    if world_size % size:
        raise ValueError(f"world size {world_size} is not divisible by distributed.sequence_parallel_size={size}")
    _sequence_parallel["group"] = None
    if size == 1:
        return
    for first in range(0, world_size, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            _sequence_parallel["group"] = group


def sequence_parallel_size() -> int:
    """P of this process (1 before `init_distributed` or without a launcher)."""
    return _sequence_parallel.get("size", 1)


def sequence_group():
    """This rank's sequence-parallel process group (None when P = 1)."""
    return _sequence_parallel.get("group")


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of the group `init_distributed` joined; (0, 1) for one process without a launcher."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if dist.is_available() and launched_by_torchrun():
        raise RuntimeError("started by a launcher but the process group was not joined: call "
                           "init_distributed(cfg.distributed.sequence_parallel_size) first, before building the task "
                           "(it shards its data by the data-parallel rank)")
    return 0, 1


def data_parallel_info() -> tuple[int, int]:
    """(dp_rank, dp_world) = (rank // P, world_size // P): which data shard this process reads."""
    rank, world_size = rank_and_world()
    size = sequence_parallel_size()
    return rank // size, world_size // size


def check_launch(cfg: DistributedConfig, world_size: int) -> None:
    """Refuse what the trainer cannot honour: several processes, or sequence parallelism, without a
    data-parallel backend (ranks would silently diverge), a world size not divisible by P, and a process
    group joined for another P."""
    backend = cfg.backend
    if world_size > 1 and backend == "none":
        raise ValueError(
            f"launched on {world_size} processes but distributed.backend='none'; set distributed.backend=ddp "
            "or distributed.backend=deepspeed"
        )
    size = cfg.sequence_parallel_size
    if size > 1 and backend == "none":
        raise ValueError(f"distributed.sequence_parallel_size={size} needs distributed.backend=ddp or deepspeed")
    if world_size % size:
        raise ValueError(f"world size {world_size} is not divisible by distributed.sequence_parallel_size={size}")
    if size != sequence_parallel_size():
        raise ValueError(f"distributed.sequence_parallel_size={size} but the process group was joined with "
                         f"{sequence_parallel_size()}; call init_distributed(cfg.distributed.sequence_parallel_size) "
                         "before building the task (its data is sharded over data-parallel groups)")


def check_same_batch(batch, group) -> None:
    """Raise unless every rank of `group` holds the same batch (a fingerprint: shapes, sums, strings)."""

    def fingerprint(value):
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), str(value.dtype), round(value.double().sum().item(), 6))
        if isinstance(value, dict):
            return {key: fingerprint(item) for key, item in sorted(value.items())}
        if isinstance(value, (list, tuple)):
            return [fingerprint(item) for item in value]
        return repr(value)

    mine = fingerprint(batch)
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    if any(other != mine for other in everyone):
        ranks = dist.get_process_group_ranks(group)
        raise ValueError(
            f"the sequence-parallel group of ranks {ranks} read different batches; a task must shard its data "
            "by data_parallel_info() (the data-parallel rank), built after init_distributed(sequence_parallel_size)"
        )


def parallelize(model: nn.Module, cfg: DistributedConfig) -> nn.Module:
    """The module the training loop calls. Sequence parallelism (P > 1) wraps the model in
    `SequenceParallelDiT` over this rank's group; backend "ddp" on more than one process then wraps that in
    `DistributedDataParallel` over all ranks, else the module is returned as is. Parameters stay shared, so
    the unwrapped model is what is saved.

    With P > 1, DDP averages over all W ranks gradients that must be summed within a group and averaged
    over the W / P groups: scale the loss by `gradient_scale(cfg)` = P before backward.
    """
    model = shard_sequence(model, cfg)
    if cfg.backend != "ddp" or not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard_sequence(model: nn.Module, cfg: DistributedConfig) -> nn.Module:
    """`SequenceParallelDiT(model, group)` over this rank's group for P > 1, else `model`."""
    if cfg.sequence_parallel_size == 1:
        return model
    from t2v.parallel.sequence import SequenceParallelDiT

    if sequence_parallel_size() != cfg.sequence_parallel_size:
        raise ValueError(f"distributed.sequence_parallel_size={cfg.sequence_parallel_size} but the process "
                         f"group was set up for {sequence_parallel_size()}; call "
                         "init_distributed(cfg.distributed.sequence_parallel_size) first")
    return SequenceParallelDiT(model, sequence_group())


def sequence_parallel_module(module: nn.Module):
    """The `SequenceParallelDiT` that `parallelize` returned, inside DDP or not; None when there is none."""
    from t2v.parallel.sequence import SequenceParallelDiT

    inner = getattr(module, "module", module)  # inside DDP or a DeepSpeed engine
    return inner if isinstance(inner, SequenceParallelDiT) else None


def gradient_scale(cfg: DistributedConfig) -> int:
    """Factor on the loss before backward: P, so DDP's mean over W ranks is the mean over W / P groups
    of each group's summed token-shard gradients."""
    return cfg.sequence_parallel_size


def sync_gradients(model: nn.Module, sync: bool):
    """Context for one micro-batch's forward and backward: DDP all-reduces gradients only when `sync`."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()

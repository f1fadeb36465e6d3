"""Where and how a process computes: device, autocast precision, peak memory, global seeds."""

from __future__ import annotations

import contextlib
import random
import resource

import numpy as np
import torch


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for "bf16" / "fp16" / "fp32" (None: no autocast); fp16 is refused on CPU."""
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError(
            "train.mixed_precision='fp16' is refused on CPU: fp16 matmuls there are ~50x slower than bf16; "
            "use 'bf16' or 'fp32'"
        )
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[mixed_precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far (MiB): the CUDA allocator's peak, or the resident-set peak on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

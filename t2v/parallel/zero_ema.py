"""EMA of the weights under DeepSpeed ZeRO (stages 1-3), sharded like the optimizer and kept in fp32.

The average runs over the optimizer's flat fp32 master partitions, so each rank averages only its own
shard: no communication per step, 1/N of the memory, and the precision of the masters even when the module
itself holds bf16 copies (an average of bf16 weights with decay 0.999 loses most updates to rounding).
The decay schedule and checkpoint format are diffusers' `EMAModel`'s, as in the single-process `EMA`, so
checkpoints move between the two.

Whole tensors are needed only to save, load and swap in the average. They go through DeepSpeed's own
per-parameter mapping (`safe_get_full_fp32_param` / `safe_set_full_fp32_param`) with the average placed
in the master partitions for the moment, so nothing here depends on how ZeRO lays out a partition.
`tensors`, `state`, `load` and `swapped_in` are collective: every rank calls them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn


def master_partitions(engine) -> list[torch.Tensor]:
    """The flat fp32 master partitions this rank's optimizer steps (ZeRO-3 sub-groups or ZeRO-1/2 groups)."""
    from t2v.parallel.deepspeed_engine import inner_optimizer

    zero = engine.optimizer
    if getattr(zero, "swap_optimizer", False):
        raise ValueError("train.ema_decay > 0 with optimizer states offloaded to NVMe: the fp32 masters the EMA "
                         "follows are swapped out of memory; offload to \"cpu\" or set train.ema_decay=0")
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        masters = list(zero.fp32_partitioned_groups_flat)
    elif hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        masters = list(zero.single_partition_of_fp32_groups)
    elif hasattr(zero, "fp32_groups_flat_partition"):  # BF16_Optimizer (bf16 with fp32 gradient accumulation)
        masters = list(zero.fp32_groups_flat_partition)
    else:
        raise ValueError(f"train.ema_decay > 0 under DeepSpeed needs a ZeRO optimizer (stage 1-3), got "
                         f"{type(zero).__name__} over {type(inner_optimizer(engine)).__name__}")
    if any(m.numel() == 0 for m in masters):
        raise ValueError("train.ema_decay > 0: an fp32 master partition is empty (swapped out?); the EMA needs "
                         "the masters in memory")
    return masters


class ShardedEMA:
    """Same interface as `t2v.train.optim.EMA`: step, swapped_in, state, load."""

    def __init__(self, engine, params: list[tuple[str, nn.Parameter]], decay: float):
        from diffusers.training_utils import EMAModel

        self.names = [name for name, _ in params]
        self.params = [p for _, p in params]
        self.masters = master_partitions(engine)
        self.model = EMAModel(self._aliases(), decay=decay, foreach=True)  # fp32 shadows, one per partition
        self.keep_whole = not dist.is_initialized() or dist.get_rank() == 0  # only rank 0 writes checkpoints

    def _aliases(self) -> list[torch.Tensor]:
        # EMAModel averages only tensors that require grad: fresh aliases of the partitions each time, so a
        # partition whose storage DeepSpeed replaced is never read through a stale view.
        return [m.detach().requires_grad_(True) for m in self.masters]

    def step(self) -> None:
        self.model.step(self._aliases())

    @contextlib.contextmanager
    def _masters_restored(self):
        """Whatever the block writes into the master partitions, the trained masters are back after it."""
        saved = [m.detach().clone() for m in self.masters]
        try:
            yield
        finally:
            with torch.no_grad():
                for master, kept in zip(self.masters, saved):
                    master.copy_(kept)

    @contextlib.contextmanager
    def _average_in_masters(self):
        """The average in the master partitions for the block."""
        with self._masters_restored():
            with torch.no_grad():
                for master, shadow in zip(self.masters, self.model.shadow_params):
                    master.copy_(shadow)
            yield

    def tensors(self):
        """(name, whole averaged fp32 CPU tensor), one at a time, on every rank (collective: every rank runs
        it to the end)."""
        from deepspeed.utils import safe_get_full_fp32_param

        with self._average_in_masters():
            for name, p in zip(self.names, self.params):
                yield name, safe_get_full_fp32_param(p).detach().cpu().clone()

    def full(self) -> dict[str, torch.Tensor] | None:
        """Whole averaged fp32 tensors by parameter name, on the CPU of rank 0; None on the other ranks, which
        take part in the gathers only (collective)."""
        whole = {name: value for name, value in self.tensors() if self.keep_whole}
        return whole if self.keep_whole else None

    def meta(self) -> dict:
        """EMAModel's settings and step (JSON)."""
        return {key: value for key, value in self.model.state_dict().items() if key != "shadow_params"}

    def _masters_to_module(self) -> None:
        """Copy what the master partitions hold into the module's whole parameters, one at a time (collective)."""
        from deepspeed.utils import safe_get_full_fp32_param

        with torch.no_grad():
            for p in self.params:
                p.copy_(safe_get_full_fp32_param(p).to(p.device, p.dtype).view_as(p))

    @contextlib.contextmanager
    def swapped_in(self):
        """The averaged weights in the module for the block. Under ZeRO-3 enter it inside a gather of the
        parameters (`deepspeed_engine.gathered`), which leaves them whole on every rank. Afterwards the
        module gets its weights back from the trained masters (the module's copies are the masters cast to
        its dtype, so nothing is kept on the side)."""
        with self._average_in_masters():
            self._masters_to_module()
        try:
            yield
        finally:
            self._masters_to_module()

    def state(self) -> tuple[dict[str, torch.Tensor] | None, dict]:
        """(whole averaged tensors on rank 0, None elsewhere; EMAModel's settings and step) (collective)."""
        return self.full(), self.meta()

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        missing = sorted(set(self.names) - set(tensors))
        if missing:
            raise ValueError(f"checkpoint EMA lacks parameters {missing[:5]} (model or LoRA setup changed?)")
        with self._masters_restored(), torch.no_grad():  # the masters carry the average for a moment
            for name, p in zip(self.names, self.params):
                safe_set_full_fp32_param(p, tensors[name].to(self.masters[0].device, torch.float32))
            shadows = [m.detach().clone() for m in self.masters]
        self.model.load_state_dict({**meta, "shadow_params": shadows})


__all__ = ["ShardedEMA", "master_partitions"]

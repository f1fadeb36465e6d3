"""How the training loop applies an update: one object, plain / DDP or DeepSpeed ZeRO behind it.

The loop makes the same calls on either backend:

    with backend.accumulating(last):                     # DDP all-reduces gradients on the last micro-batch only
        out = task.loss(backend.forward_model, batch, generator)
        backend.backward(out.loss, last)
    skipped, grad_norm = backend.step(loss)              # clip, AdamW, LR schedule; or skip a non-finite update
    model_state, optimizer_state = backend.full_state()  # whole, unwrapped tensors for a checkpoint (collective)
    stream, meta = backend.state_stream()                # ZeRO: the same, one tensor at a time (collective)
    backend.load_full_state(model_state, optimizer_state)
    with backend.gathered(): ...                         # whole parameters in the module (ZeRO-3; collective)

The caller builds AdamW, LR schedule and EMA (`make_optimizer(groups)`, `make_scheduler(optimizer)`,
`make_ema(params, decay)`), so both backends step the same optimizer: ZeRO wraps it around its flat fp32
partitions and keeps its own EMA sharded like them (t2v.parallel.zero_ema). Checkpoints hold the same whole
tensors under either backend, so a run resumes under the other one; under ZeRO `state_stream` hands them
over one at a time, so that each rank keeps only its share of a sharded checkpoint.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from t2v.config import Config
from t2v.parallel import distributed as par


class NonFiniteLossError(RuntimeError):
    """Training met more non-finite losses in a row than it may skip, or an update applied one."""


class Backend:
    """What both backends share: the module the loss calls, its sequence-parallel wrapper, schedule, scaler."""

    forward_model: nn.Module  # what the task's loss calls: the model, DDP around it, or the DeepSpeed engine
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: object | None  # step(), swapped_in(), state(), load(); None when train.ema_decay == 0

    def __init__(self, params: list[tuple[str, nn.Parameter]], cfg: Config, device: torch.device):
        self.params = params
        self.cfg = cfg
        self.fp16 = cfg.train.mixed_precision == "fp16"
        # Loss scaling for fp16 (a no-op otherwise); under ZeRO DeepSpeed scales itself and this one stays
        # unused, so checkpoints carry the same "scaler" entry under either backend.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.fp16)
        # DDP / ZeRO average over all ranks; a sequence-parallel group's token-shard gradients must add up: x P.
        self.loss_scale = par.gradient_scale(cfg.distributed)

    @property
    def sequence(self):
        """The `SequenceParallelDiT` the loss calls (inside DDP or the engine), or None."""
        return par.sequence_parallel_module(self.forward_model)

    def accumulating(self, last: bool):
        """Context for one micro-batch's forward and backward."""
        return contextlib.nullcontext()

    def gathered(self):
        """Context with whole parameters in the module on every rank (collective under ZeRO-3)."""
        return contextlib.nullcontext()


class PlainBackend(Backend):
    """torch AdamW with GradScaler (fp16) and clip_grad_norm_; DDP on several processes, sequence parallel
    (P > 1) inside it (`parallelize`)."""

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]], groups: list[dict], cfg: Config,
                 device: torch.device, make_optimizer: Callable, make_scheduler: Callable, make_ema: Callable):
        super().__init__(params, cfg, device)
        self.model = model
        self.forward_model = par.parallelize(model, cfg.distributed)
        self.optimizer = make_optimizer(groups)
        self.lr_scheduler = make_scheduler(self.optimizer)
        decay = cfg.train.ema_decay
        self.ema = make_ema(params, decay) if decay > 0 else None

    def accumulating(self, last: bool):
        return par.sync_gradients(self.forward_model, last)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.scaler.scale(loss * self.loss_scale / self.cfg.train.grad_accum).backward()

    def step(self, loss: float) -> tuple[bool, float]:
        """Clip and update; returns (skipped, grad_norm). A non-finite loss (all-reduced, so every rank agrees),
        or a non-finite gradient without fp16, skips the update; with fp16 the scaler itself skips updates
        whose gradients overflowed, which count as steps."""
        clip = self.cfg.train.grad_clip
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.params], clip if clip > 0 else float("inf"))
        grad_norm = grad_norm.item()
        skipped = not math.isfinite(loss) or (not self.fp16 and not math.isfinite(grad_norm))
        if skipped:
            self.scaler.update()  # a no-op without fp16
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return skipped, grad_norm

    def full_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.model.state_dict(), self.optimizer.state_dict()

    def load_full_state(self, model_state: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        """The optimizer's state; the module already holds `model_state` (loaded before the backend)."""
        self.optimizer.load_state_dict(optimizer_state)


class ZeroBackend(Backend):
    """DeepSpeed ZeRO 1/2/3: the engine accumulates, clips, steps AdamW and the LR schedule, and skips
    updates its all-reduced overflow check rejects."""

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]], groups: list[dict], cfg: Config,
                 device: torch.device, make_optimizer: Callable, make_scheduler: Callable):
        from t2v.parallel import deepspeed_engine
        from t2v.parallel.zero_ema import ShardedEMA

        super().__init__(params, cfg, device)
        self.groups = groups  # their order indexes the optimizer state in checkpoints
        _, world_size = par.rank_and_world()
        self.engine = deepspeed_engine.initialize(par.shard_sequence(model, cfg.distributed), groups, make_optimizer,
                                                  make_scheduler, cfg, world_size)
        self.forward_model = self.engine
        self.lr_scheduler = self.engine.lr_scheduler
        decay = cfg.train.ema_decay
        self.ema = ShardedEMA(self.engine, params, decay) if decay > 0 else None

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # A non-finite loss makes every gradient NaN, so the engine's own overflow check (a global, all-reduced
        # verdict) discards the accumulated gradients and skips AdamW and the LR schedule.
        poison = torch.where(torch.isfinite(loss), 1.0, float("nan")).detach()
        self.engine.backward(loss * poison * self.loss_scale)  # DeepSpeed divides by grad_accum itself
        if not last:
            self.engine.step()  # counts the micro-batch; updates only at the accumulation boundary

    def step(self, loss: float) -> tuple[bool, float]:
        """The engine's update; returns (skipped, grad_norm). With fp16 its loss scaler skips updates whose
        gradients overflowed, which count as steps (as GradScaler's do)."""
        self.engine.step()
        grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        applied = self.engine.was_step_applied()
        if applied and not math.isfinite(loss):
            raise NonFiniteLossError(f"non-finite loss {loss} but DeepSpeed applied the update (is its bf16 "
                                     "check_grad_overflow off?)")
        return not applied and not self.fp16, grad_norm

    def full_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(model state with the fp32 master weights, torch AdamW state), whole, on every rank (collective)."""
        from t2v.parallel import deepspeed_engine

        return deepspeed_engine.full_state(self.engine, self.groups)

    def load_full_state(self, model_state: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        """Master weights and AdamW moments into this rank's partitions (collective); the module already
        holds `model_state` (loaded before the backend, so ZeRO partitioned it)."""
        from t2v.parallel import deepspeed_engine

        deepspeed_engine.load_full_state(self.engine, self.groups, model_state, optimizer_state)

    def gathered(self):
        from t2v.parallel import deepspeed_engine

        return deepspeed_engine.gathered(self.engine)

    def state_stream(self):
        """(every checkpoint tensor as (group, name, whole CPU tensor), one at a time and in the same order on
        every rank; JSON meta: "optimizer" param groups and scalars, "ema" settings). Collective: every rank
        runs the stream to the end. Groups: "model" (fp32 masters), "optimizer" (flattened as
        `t2v.train.checkpoint.flatten_optimizer_state` does), "ema"."""
        from t2v.parallel import deepspeed_engine

        meta = {"optimizer": {"param_groups": deepspeed_engine.optimizer_groups(self.engine, self.groups),
                              "scalars": {}}}
        if self.ema is not None:
            meta["ema"] = self.ema.meta()

        def stream():
            yield from deepspeed_engine.state_tensors(self.engine, self.groups)
            if self.ema is not None:
                for name, tensor in self.ema.tensors():
                    yield "ema", name, tensor

        return stream(), meta


def build_backend(model: nn.Module, params: list[tuple[str, nn.Parameter]], groups: list[dict], cfg: Config,
                  device: torch.device, make_optimizer: Callable, make_scheduler: Callable,
                  make_ema: Callable) -> Backend:
    """`ZeroBackend` for distributed.backend "deepspeed", else `PlainBackend`.

    `params` are the trained (name, parameter) pairs, `groups` their AdamW param groups. Load resumed weights
    into `model` before: ZeRO partitions what the module holds.
    """
    if cfg.distributed.backend == "deepspeed":
        return ZeroBackend(model, params, groups, cfg, device, make_optimizer, make_scheduler)
    return PlainBackend(model, params, groups, cfg, device, make_optimizer, make_scheduler, make_ema)

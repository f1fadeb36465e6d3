"""The training loop shared by every task (DiT, VAE, retriever).

A task owns its models and data and knows its loss; `train(cfg, task)` owns everything else:
trainable parameters (full, a subset, or LoRA), AdamW, the warm-up + decay schedule, autocast,
gradient accumulation and clipping, EMA, non-finite-loss skipping, logging, checkpoints with exact
resume, periodic validation and the final export (with EMA weights).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from t2v.config import Config, save_config
from t2v.parallel import distributed as par
from t2v.runtime import autocast, autocast_dtype, peak_memory_mb
from t2v.train import checkpoint as ckpt
from t2v.train.logger import MetricsLogger
from t2v.train.optim import EMA, build_adamw, build_lr_scheduler, param_groups
from t2v.train.trainable import compile_model, prepare_trainable

# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    """What a task's loss returns for one micro-batch."""

    loss: torch.Tensor  # scalar, fp32
    samples: int  # samples in the micro-batch
    tokens: int  # model tokens in the micro-batch (latent tokens for the DiT)
    metrics: dict[str, float] = field(default_factory=dict)  # extra per-step numbers to log


class Task(Protocol):
    """A training task: models, data and loss; the loop does the rest."""

    model: nn.Module  # the module being trained
    device: torch.device

    def next_batch(self) -> Any: ...

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> StepOutput: ...

    def state_dict(self) -> dict: ...  # data position and task generators, JSON-serialisable

    def load_state_dict(self, state: dict) -> None: ...

    def validate(self, model: nn.Module, step: int) -> dict[str, float]: ...  # rank 0, EMA weights in

    def export(self, model: nn.Module) -> None: ...  # rank 0, EMA weights in, at the end

    # Optional hooks, used when a task defines them:
    #   param_groups(params, cfg: TrainConfig) -> list[dict]   AdamW groups (default: optim.param_groups)
    #   after_update(model) -> None                             after each applied optimizer update


@dataclass
class TrainState:
    step: int = 0  # optimizer updates done
    nonfinite_in_a_row: int = 0


class NonFiniteLossError(RuntimeError):
    pass


def _out_of_time(deadline: float | None, device: torch.device, world_size: int) -> bool:
    """True once the wall-clock budget is spent; every rank takes rank 0's answer."""
    if deadline is None:
        return False
    flag = torch.tensor(float(time.monotonic() >= deadline), device=device)
    if world_size > 1:
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def train(cfg: Config, task: Task) -> TrainState:
    """Train `task.model` to `cfg.train.max_steps`, resuming from `cfg.resume`; returns the final state.

    distributed.backend "ddp" wraps the model in DDP, "deepspeed" hands model, AdamW and schedule to a ZeRO
    engine (t2v.parallel); checkpoints hold whole, unwrapped tensors either way. With
    distributed.sequence_parallel_size P > 1, groups of P ranks share a batch and split its tokens.
    """
    tc = cfg.train
    rank, world_size = par.init_distributed()
    par.check_launch(cfg.distributed, world_size)
    par.init_distributed(cfg.distributed.sequence_parallel_size)  # refuses a layout other than the task's
    dp_rank, dp_world = par.data_parallel_info()  # data shard; the ranks of a sequence-parallel group share one
    device = task.device
    dtype = autocast_dtype(tc.mixed_precision, device)  # chosen once for the whole run
    is_main = rank == 0
    resume_from = ckpt.resolve_resume(cfg.resume, cfg.output_dir)
    if not cfg.resume and (held := ckpt.run_files(cfg.output_dir)):
        raise ValueError(f"output_dir {cfg.output_dir!r} holds another run ({', '.join(held)}); continue it with "
                         f"resume=latest, or give a new output_dir")
    if is_main:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))

    # 1. what is trained, and how
    model = task.model
    params = prepare_trainable(model, cfg.model)
    if tc.compile:
        compile_model(model)
    trained = [p for _, p in params]
    groups = task.param_groups(params, tc) if hasattr(task, "param_groups") else param_groups(params, tc)
    root = ckpt.checkpoint_root(cfg.output_dir)
    if resume_from is not None:  # weights first: DeepSpeed partitions what the module holds
        tensors, meta = ckpt.load_checkpoint(resume_from)
        model.load_state_dict(tensors["model"])
    engine = None
    if cfg.distributed.backend == "deepspeed":
        from t2v.parallel import deepspeed_engine
        from t2v.parallel.zero_ema import ShardedEMA

        engine = deepspeed_engine.initialize(par.shard_sequence(model, cfg.distributed), groups,
                                             lambda opt: build_lr_scheduler(opt, tc), cfg, world_size)
        forward_model, optimizer, lr_scheduler = engine, engine.optimizer, engine.lr_scheduler
    else:
        optimizer = build_adamw(groups, tc)
        lr_scheduler = build_lr_scheduler(optimizer, tc)
        forward_model = par.parallelize(model, cfg.distributed)  # sequence parallel, then DDP on several ranks
    sequence = par.sequence_parallel_module(forward_model)  # the SequenceParallelDiT inside, or None
    # DDP / ZeRO average over all ranks; a sequence-parallel group's token-shard gradients must add up: x P.
    loss_scale = par.gradient_scale(cfg.distributed)
    ema = None
    if tc.ema_decay > 0:  # under ZeRO the average is sharded like the fp32 masters it follows
        ema = (ShardedEMA(engine, params, tc.ema_decay) if engine is not None
               else EMA(params, tc.ema_decay))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # Noise, sigmas, latent samples; reseeded per global micro-batch (par.noise_seed), so topology-free.
    generator = torch.Generator(device).manual_seed(tc.seed + rank)
    state = TrainState()

    # 2. resume
    if resume_from is not None:
        opt_state = ckpt.unflatten_optimizer_state(tensors.get("optimizer", {}), meta["optimizer"])
        lr_scheduler.load_state_dict(meta["lr_scheduler"])
        if engine is not None:
            deepspeed_engine.load_full_state(engine, groups, tensors["model"], opt_state)
        else:
            optimizer.load_state_dict(opt_state)
        scaler.load_state_dict(meta["scaler"])
        if ema is not None:
            if "ema" not in meta:
                raise ValueError(f"checkpoint {resume_from!r} has no EMA but train.ema_decay={tc.ema_decay}")
            ema.load(tensors["ema"], meta["ema"])
        task.load_state_dict(meta["task"])
        state = TrainState(**meta["train_state"])
        par.restore_rng(tensors["rng"], meta["rng"], {"train": generator}, tc.seed, state.step)

    def save() -> None:
        # Collective parts first (every rank), then rank 0 writes whole, unwrapped tensors.
        rng_tensors, rng_meta = par.gather_rng({"train": generator})
        if engine is not None:
            model_state, opt_state = deepspeed_engine.full_state(engine, groups)
        else:
            model_state, opt_state = model.state_dict(), optimizer.state_dict()
        ema_state = ema.state() if ema is not None else None  # collective under ZeRO
        if is_main:
            opt_tensors, opt_meta = ckpt.flatten_optimizer_state(opt_state)
            tensors = {"model": model_state, "optimizer": opt_tensors, "rng": rng_tensors}
            meta = {
                "train_state": vars(state).copy(),
                "optimizer": opt_meta,
                "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "task": task.state_dict(),
                "rng": rng_meta,
            }
            if ema_state is not None:
                tensors["ema"], meta["ema"] = ema_state
            ckpt.save_checkpoint(root, state.step, tensors, meta, keep_last=tc.keep_last)
        if world_size > 1:
            dist.barrier()

    def whole_params():  # ZeRO-3 gathers the partitioned parameters (every rank enters)
        return deepspeed_engine.gathered(engine) if engine is not None else contextlib.nullcontext()

    def single_device():  # the model without the sequence-parallel hook, for rank 0 alone
        return sequence.detached() if sequence is not None else contextlib.nullcontext()

    def ema_weights():  # every rank enters (collective under ZeRO), inside whole_params()
        return ema.swapped_in() if ema is not None else contextlib.nullcontext()

    # 3. the loop
    logger = MetricsLogger(cfg.output_dir, enabled=is_main, start_step=state.step)
    progress = tqdm(total=tc.max_steps, initial=state.step, disable=not is_main, desc="train", dynamic_ncols=True)
    window = {"loss": 0.0, "updates": 0, "samples": 0, "tokens": 0, "start": time.perf_counter()}
    model.train()
    deadline = time.monotonic() + 60 * tc.max_minutes if tc.max_minutes > 0 else None
    start_step = state.step
    while state.step < tc.max_steps and not _out_of_time(deadline, device, world_size):
        # 3a. forward and backward over grad_accum micro-batches
        step_loss, extra = torch.zeros((), device=device), {}
        samples = tokens = 0
        for micro in range(tc.grad_accum):
            batch = task.next_batch()
            if sequence is not None and micro == 0 and state.step == start_step:
                par.check_same_batch(batch, sequence.group)
            generator.manual_seed(par.noise_seed(tc.seed, par.micro_batch_index(
                state.step, micro, tc.grad_accum, dp_rank, dp_world)))
            last = micro == tc.grad_accum - 1
            with par.sync_gradients(forward_model, last):
                with autocast(device, dtype):
                    out = task.loss(forward_model, batch, generator)
                if engine is not None:
                    # A non-finite loss makes every gradient NaN, so the engine's own overflow check (a global,
                    # all-reduced verdict) discards the accumulated gradients and skips AdamW and the LR schedule.
                    poison = torch.where(torch.isfinite(out.loss), 1.0, float("nan")).detach()
                    engine.backward(out.loss * poison * loss_scale)  # DeepSpeed divides by grad_accum itself
                    if not last:
                        engine.step()  # counts the micro-batch; updates only at the accumulation boundary
                else:
                    scaler.scale(out.loss * loss_scale / tc.grad_accum).backward()
            step_loss += out.loss.detach() / tc.grad_accum
            samples, tokens, extra = samples + out.samples, tokens + out.tokens, out.metrics
        if world_size > 1:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)

        # 3b. update: DeepSpeed clips and steps inside its engine; otherwise clip here. A non-finite loss
        # (the all-reduced one, so every rank agrees) or gradient skips the update.
        loss_value = step_loss.item()
        if engine is not None:
            engine.step()  # clip, AdamW, LR schedule, zero gradients; skipped on non-finite gradients
            grad_norm = torch.as_tensor(float(engine.get_global_grad_norm() or 0.0))
            applied = engine.was_step_applied()
            if applied and not math.isfinite(loss_value):
                raise NonFiniteLossError(f"non-finite loss {loss_value} at step {state.step} but DeepSpeed applied "
                                         "the update (is its bf16 check_grad_overflow off?); last good checkpoint: "
                                         f"{ckpt.latest_checkpoint(root) or 'none'}")
            # With fp16 the engine's loss scaler skips updates whose gradients overflowed, as GradScaler does.
            skip = not applied and tc.mixed_precision != "fp16"
        else:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            # With fp16 the scaler itself skips updates whose gradients overflowed.
            skip = not math.isfinite(loss_value) or (not scaler.is_enabled() and not math.isfinite(grad_norm.item()))
            if skip:
                if scaler.is_enabled():
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
        if skip:
            state.nonfinite_in_a_row += 1
            logger.log(state.step, {"loss": loss_value, "grad_norm": grad_norm.item(), "skipped_nonfinite": True,
                                    "nonfinite_in_a_row": state.nonfinite_in_a_row})
            if state.nonfinite_in_a_row >= tc.max_nonfinite_steps:
                last = ckpt.latest_checkpoint(root)
                logger.close()
                progress.close()
                raise NonFiniteLossError(
                    f"stopping at step {state.step}: {state.nonfinite_in_a_row} non-finite losses in a row "
                    f"(train.max_nonfinite_steps={tc.max_nonfinite_steps}); last good checkpoint: {last or 'none'}"
                )
            continue
        if engine is None:
            scaler.step(optimizer)  # skips the update itself when fp16 gradients overflowed
            scaler.update()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if hasattr(task, "after_update"):
            task.after_update(model)
        if ema is not None:
            ema.step()
        state.step += 1
        state.nonfinite_in_a_row = 0
        progress.update(1)

        # 3c. logging
        window["loss"] += loss_value
        window["updates"] += 1
        window["samples"] += samples * dp_world
        window["tokens"] += tokens * dp_world
        if state.step % tc.log_every == 0 or state.step == tc.max_steps:
            elapsed = max(time.perf_counter() - window["start"], 1e-9)
            metrics = {
                "loss": window["loss"] / window["updates"],
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": grad_norm.item(),
                "samples_per_s": window["samples"] / elapsed,
                "tokens_per_s": window["tokens"] / elapsed,
                "peak_mem_mb": peak_memory_mb(device),
                **extra,
            }
            logger.log(state.step, metrics)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            window = {"loss": 0.0, "updates": 0, "samples": 0, "tokens": 0, "start": time.perf_counter()}

        # 3d. checkpoint and validation
        if tc.ckpt_every and state.step % tc.ckpt_every == 0 and state.step < tc.max_steps:
            save()
        if tc.validate_every and state.step % tc.validate_every == 0:
            with whole_params(), ema_weights(), single_device():
                if is_main:
                    model.eval()
                    with torch.no_grad(), autocast(device, dtype):
                        logger.log(state.step, task.validate(model, state.step))
                    model.train()
            window["start"] = time.perf_counter()  # keep validation out of the throughput numbers

    # 4. final checkpoint; final validation and export with the averaged weights
    progress.close()
    save()
    if sequence is not None:
        sequence.close()
    with whole_params(), ema_weights():
        if is_main:
            model.eval()
            with torch.no_grad():
                if not (tc.validate_every and state.step % tc.validate_every == 0):
                    with autocast(device, dtype):
                        logger.log(state.step, task.validate(model, state.step))
                task.export(model)
    logger.close()
    return state

"""The training loop shared by every task (DiT, VAE, retriever).

A task owns its models and data and knows its loss; `train(cfg, task)` owns everything else:
trainable parameters (full, a subset, or LoRA: t2v.train.trainable), AdamW, the warm-up + decay schedule
and EMA (t2v.train.optim), autocast, gradient accumulation and clipping through one backend (plain / DDP or
DeepSpeed ZeRO: t2v.parallel.backend), non-finite-loss skipping, logging, checkpoints with exact resume
(t2v.train.checkpoint, t2v.train.rng), periodic validation and the final export (with EMA weights).
"""

from __future__ import annotations

import contextlib
import functools
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
from t2v.parallel.backend import NonFiniteLossError, build_backend
from t2v.runtime import autocast, autocast_dtype, peak_memory_mb
from t2v.train import checkpoint as ckpt
from t2v.train import rng
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

    The entry point joined the launcher's process group before building the task
    (`init_distributed(cfg.distributed.sequence_parallel_size)`). distributed.backend "ddp" wraps the model in
    DDP, "deepspeed" hands model, AdamW and schedule to a ZeRO engine (t2v.parallel.backend); checkpoints
    hold whole, unwrapped tensors either way. With distributed.sequence_parallel_size P > 1, groups of P ranks
    share a batch and split its tokens.
    """
    tc = cfg.train
    rank, world_size = par.rank_and_world()
    par.check_launch(cfg.distributed, world_size)
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
    groups = task.param_groups(params, tc) if hasattr(task, "param_groups") else param_groups(params, tc)
    root = ckpt.checkpoint_root(cfg.output_dir)
    if resume_from is not None:  # weights first: ZeRO partitions what the module holds
        # Under ZeRO every rank reads the whole checkpoint: mapped, so only what each rank copies out is read.
        tensors, meta = ckpt.load_checkpoint(resume_from, mapped=cfg.distributed.backend == "deepspeed")
        model.load_state_dict(tensors["model"])
    backend = build_backend(model, params, groups, cfg, device,
                            make_optimizer=functools.partial(build_adamw, cfg=tc),
                            make_scheduler=functools.partial(build_lr_scheduler, cfg=tc), make_ema=EMA)
    ema, sequence = backend.ema, backend.sequence  # sequence: the SequenceParallelDiT the loss calls, or None
    # Noise, sigmas, latent samples; reseeded per global micro-batch (rng.noise_seed), so topology-free.
    generator = torch.Generator(device).manual_seed(tc.seed + rank)
    state = TrainState()

    # 2. resume
    if resume_from is not None:
        opt_state = ckpt.unflatten_optimizer_state(tensors.get("optimizer", {}), meta["optimizer"])
        backend.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        backend.load_full_state(tensors["model"], opt_state)
        backend.scaler.load_state_dict(meta["scaler"])
        if ema is not None:
            if "ema" not in meta:
                raise ValueError(f"checkpoint {resume_from!r} has no EMA but train.ema_decay={tc.ema_decay}")
            ema.load(tensors["ema"], meta["ema"])
        task.load_state_dict(meta["task"])
        state = TrainState(**meta["train_state"])
        rng.restore_or_reseed_rng(tensors["rng"], meta["rng"], {"train": generator}, tc.seed, state.step)

    def save() -> None:
        rng_tensors, rng_meta = rng.gather_rng({"train": generator})  # collective
        meta = {
            "train_state": vars(state).copy(),
            "lr_scheduler": backend.lr_scheduler.state_dict(),
            "scaler": backend.scaler.state_dict(),
            "task": task.state_dict(),
            "rng": rng_meta,
        }
        if cfg.sharded_checkpoints:  # every rank writes its share of the whole tensors (collective)
            stream, backend_meta = backend.state_stream()
            ckpt.save_sharded(root, state.step, stream, {"rng": rng_tensors}, {**meta, **backend_meta},
                              keep_last=tc.keep_last)
            return
        # Collective parts first (every rank), then rank 0 writes whole, unwrapped tensors.
        model_state, opt_state = backend.full_state()
        ema_state = ema.state() if ema is not None else None  # collective under ZeRO
        if is_main:
            opt_tensors, meta["optimizer"] = ckpt.flatten_optimizer_state(opt_state)
            tensors = {"model": model_state, "optimizer": opt_tensors, "rng": rng_tensors}
            if ema_state is not None:
                tensors["ema"], meta["ema"] = ema_state
            ckpt.save_checkpoint(root, state.step, tensors, meta, keep_last=tc.keep_last)
        if world_size > 1:
            dist.barrier()

    def single_device():  # the model without the sequence-parallel hook, for rank 0 alone
        return sequence.detached() if sequence is not None else contextlib.nullcontext()

    def ema_weights():  # every rank enters (collective under ZeRO), inside backend.gathered()
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
            generator.manual_seed(rng.noise_seed(tc.seed, rng.micro_batch_index(
                state.step, micro, tc.grad_accum, dp_rank, dp_world)))
            last = micro == tc.grad_accum - 1
            with backend.accumulating(last):
                with autocast(device, dtype):
                    out = task.loss(backend.forward_model, batch, generator)
                backend.backward(out.loss, last)
            step_loss += out.loss.detach() / tc.grad_accum
            samples, tokens, extra = samples + out.samples, tokens + out.tokens, out.metrics
        if world_size > 1:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)

        # 3b. update (clip, AdamW, LR schedule); a non-finite loss (the all-reduced one, so every rank agrees)
        # or gradient skips it
        loss_value = step_loss.item()
        skipped, grad_norm = backend.step(loss_value)
        if skipped:
            state.nonfinite_in_a_row += 1
            logger.log(state.step, {"loss": loss_value, "grad_norm": grad_norm, "skipped_nonfinite": True,
                                    "nonfinite_in_a_row": state.nonfinite_in_a_row})
            if state.nonfinite_in_a_row >= tc.max_nonfinite_steps:
                last_good = ckpt.latest_checkpoint(root)
                logger.close()
                progress.close()
                raise NonFiniteLossError(
                    f"stopping at step {state.step}: {state.nonfinite_in_a_row} non-finite losses in a row "
                    f"(train.max_nonfinite_steps={tc.max_nonfinite_steps}); last good checkpoint: {last_good or 'none'}"
                )
            continue
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
                "lr": backend.lr_scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
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
            with backend.gathered(), ema_weights(), single_device():
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
    with backend.gathered(), ema_weights():
        if is_main:
            model.eval()
            with torch.no_grad():
                if not (tc.validate_every and state.step % tc.validate_every == 0):
                    with autocast(device, dtype):
                        logger.log(state.step, task.validate(model, state.step))
                task.export(model)
    logger.close()
    return state

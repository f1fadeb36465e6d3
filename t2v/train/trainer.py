"""The training loop shared by the DiT and VAE tasks, and the small pieces it is built from.

A task owns its models and data and knows its loss; `train(cfg, task)` owns everything else:
trainable parameters (full, a subset, or LoRA), AdamW, the warm-up + decay schedule, autocast,
gradient accumulation and clipping, EMA, non-finite-loss skipping, logging, checkpoints with exact
resume, periodic validation and the final export (with EMA weights).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from t2v.config import Config, ModelConfig, TrainConfig, save_config
from t2v.parallel import distributed as par
from t2v.train import checkpoint as ckpt
from t2v.train.logger import MetricsLogger

# ----------------------------------------------------------------------------------------------------
# Environment: ranks, device, precision
# ----------------------------------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    """(data-parallel rank, data-parallel world size): the data shard a task reads; (rank, world_size)
    without sequence parallelism. Joins the launcher's process group on first use, else (0, 1)."""
    return par.data_parallel_info()


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
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Models from presets and folders
# ----------------------------------------------------------------------------------------------------


def resolve_model_spec(spec: str, kind: str) -> str:
    """A folder or YAML path as given; a bare preset name ("tiny") -> t2v/models/configs/{kind}_{name}.yaml."""
    if not spec:
        raise ValueError(f"model.{kind} is empty; give a preset name, a YAML file or a model folder")
    if os.path.isdir(spec) or spec.endswith((".yaml", ".yml")):
        if not os.path.exists(spec):
            raise ValueError(f"model.{kind}={spec!r} does not exist")
        return spec
    from t2v.models.presets import preset_path

    return str(preset_path(kind, spec))


def build_model(cls, spec: str, kind: str, seed: int) -> nn.Module:
    """`cls.from_pretrained(folder)`, or `cls.from_config(yaml)` initialised from `seed`."""
    path = resolve_model_spec(spec, kind)
    if os.path.isdir(path):
        return cls.from_pretrained(path)
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    return cls.from_config(OmegaConf.to_container(OmegaConf.load(path)))


def load_vae(spec: str, seed: int) -> nn.Module:
    """Our `CausalVideoVAE` (preset, YAML or folder) or a diffusers `AutoencoderKLWan` folder.

    A folder's class comes from `_class_name` in its config.json.
    """
    from t2v.models.vae import CausalVideoVAE

    path = resolve_model_spec(spec, "vae")
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise ValueError(f"model.vae={spec!r} is a folder without config.json")
        with open(config_file) as f:
            class_name = json.load(f).get("_class_name")
        if class_name == "AutoencoderKLWan":
            from diffusers import AutoencoderKLWan

            return AutoencoderKLWan.from_pretrained(path)
        if class_name not in (None, "CausalVideoVAE"):
            raise ValueError(f"VAE folder {path!r} holds a {class_name}; expected CausalVideoVAE or AutoencoderKLWan")
    return build_model(CausalVideoVAE, path, "vae", seed)


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False).eval()
    return module


def prepare_trainable(model: nn.Module, cfg: ModelConfig) -> list[tuple[str, nn.Parameter]]:
    """Apply gradient checkpointing and LoRA, set requires_grad, return the trained (name, parameter) list.

    lora_rank > 0 adds PEFT LoRA adapters on `lora_target_modules` and trains them only; `trainable`
    name prefixes add (or, without LoRA, restrict to) fully trained parameters.
    """
    if cfg.gradient_checkpointing:
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise ValueError(f"model.gradient_checkpointing=true but {type(model).__name__} does not support it")
        model.enable_gradient_checkpointing()
    if cfg.lora_rank > 0:
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha or cfg.lora_rank,
            target_modules=list(cfg.lora_target_modules),
            init_lora_weights=True,
        )
        if hasattr(model, "add_adapter"):  # diffusers' PeftAdapterMixin
            model.add_adapter(lora)
        else:
            inject_adapter_in_model(lora, model)
    prefixes = tuple(cfg.trainable)
    for name, param in model.named_parameters():
        if cfg.lora_rank > 0:
            param.requires_grad_("lora_" in name or (bool(prefixes) and name.startswith(prefixes)))
        else:
            param.requires_grad_(not prefixes or name.startswith(prefixes))
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"model.trainable={list(prefixes)} matches no parameter of {type(model).__name__}")
    return params


def compile_model(model: nn.Module) -> nn.Module:
    """torch.compile each block of `model.blocks` in place (as torchtitan does): one graph serves every block of
    a shape, it compiles quickly, and DDP wraps an ordinary module. Parameter names and the state dict are
    unchanged. A model without a `blocks` ModuleList (the VAEs, which the loop calls through `encode` and
    `decode`, not `__call__`) is refused rather than silently left uncompiled."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"train.compile=true compiles transformer blocks, and {type(model).__name__} has no "
                         "`blocks` list; train it with train.compile=false")
    for block in blocks:
        block.compile()
    return model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the base weights and put the plain layers back, in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    return model


# ----------------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------------


def param_groups(params: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not on biases, norms, or modulation vectors)."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(params: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(params, cfg), lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """LR multiplier for optimizer update `step` (0-based): linear warm-up, then constant/cosine/linear to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA:
    """diffusers' `EMAModel` over named trainable parameters, with swap-in for validation and export."""

    def __init__(self, params: list[tuple[str, nn.Parameter]], decay: float):
        from diffusers.training_utils import EMAModel

        self.names = [name for name, _ in params]
        self.params = [p for _, p in params]
        self.model = EMAModel(self.params, decay=decay, foreach=False)

    def step(self) -> None:
        self.model.step(self.params)

    @contextlib.contextmanager
    def swapped_in(self):
        """Run the block with the averaged weights in the model, then put the trained ones back."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        meta = self.model.state_dict()
        shadow = meta.pop("shadow_params")
        return dict(zip(self.names, shadow)), meta

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        missing = sorted(set(self.names) - set(tensors))
        if missing:
            raise ValueError(f"checkpoint EMA lacks parameters {missing[:5]} (model or LoRA setup changed?)")
        device = self.params[0].device
        shadow = [tensors[name].to(device) for name in self.names]
        self.model.load_state_dict({**meta, "shadow_params": shadow})


# ----------------------------------------------------------------------------------------------------
# Data streams: endless, resumable batches
# ----------------------------------------------------------------------------------------------------


class LoaderStream:
    """Batches from a DataLoader over a `BucketBatchSampler`, epoch after epoch, resumable mid-epoch.

    The position is the sampler's (epoch, global batches done), counted from the batches taken here,
    so DataLoader workers prefetching ahead do not move it.
    """

    def __init__(self, dataset, sampler, collate_fn=None, num_workers: int = 0, seed: int = 0):
        from torch.utils.data import DataLoader

        self.dataset, self.sampler = dataset, sampler
        # An explicit generator keeps the loader from drawing on the global RNG.
        self.loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                                 generator=torch.Generator().manual_seed(seed))
        self._iterator = None
        self._taken = 0

    def __next__(self):
        for _ in range(2):  # at most one epoch boundary per batch
            if self._iterator is None:
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(self.sampler.epoch)
                self._iterator, self._taken = iter(self.loader), 0
            try:
                batch = next(self._iterator)
                self._taken += 1
                return batch
            except StopIteration:
                if hasattr(self.dataset, "report_skipped"):
                    self.dataset.report_skipped()
                self.sampler.set_epoch(self.sampler.epoch + 1)
                self._iterator = None
        raise ValueError(
            f"an epoch of {len(self.dataset)} samples yields no full batch; lower data.batch_size or add data"
        )

    def state_dict(self) -> dict:
        return self.sampler.state_dict(consumed=self._taken)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._iterator = None


def manifest_stream(cfg: Config, rows: list[dict], caption_dropout: float, rank: int, world_size: int):
    """(dataset, LoaderStream) over manifest rows with the configured buckets."""
    from t2v.data.buckets import BucketBatchSampler, parse_buckets
    from t2v.data.dataset import VideoTextDataset, collate_skip_none

    data = cfg.data
    buckets = parse_buckets(
        [vars(b) for b in data.buckets]
        or [{"frames": data.frames, "height": data.height, "width": data.width, "batch_size": data.batch_size}]
    )
    dataset = VideoTextDataset(rows, buckets, fps=data.fps, caption_dropout=caption_dropout, seed=cfg.train.seed)
    sampler = BucketBatchSampler(dataset.bucket_ids, buckets, seed=cfg.train.seed, rank=rank, world_size=world_size)
    return dataset, LoaderStream(dataset, sampler, collate_skip_none, data.num_workers, cfg.train.seed)


def next_readable(stream: LoaderStream, dataset, manifest: str = "") -> dict:
    """The next manifest batch with at least one readable video; unreadable files are counted, not fatal.

    As many unreadable samples in a row as the data set holds, and none readable, is an error naming the
    `manifest` and the counts by cause (a manifest whose every file is unreadable would otherwise loop for ever).
    """
    unreadable: Counter = Counter()
    while True:
        batch = next(stream)
        dataset.count_skipped(batch["skipped"])
        if batch["video"] is not None:
            return batch
        unreadable.update(batch["skipped"])
        if sum(unreadable.values()) >= len(dataset):
            raise ValueError(f"data.manifest={manifest!r}: {sum(unreadable.values())} samples in a row were unreadable and none "
                             f"readable (by cause: {dict(unreadable)}); check the paths and files it lists")


class ShapesBatches:
    """In-memory Shapes World batches {"video": (B, 3, T, H, W) in [-1, 1], "caption": [str]}, resumable.

    One numpy generator per stream (use the rank for training) draws everything: records, wording,
    caption dropout; its state is the stream position.
    """

    def __init__(self, batch_size: int, seed: int, stream: int, canonical_prob: float, caption_dropout: float,
                 device: torch.device, split: str = "train", wordings: str = "base", two_object_prob: float = 0.5):
        self.batch_size, self.canonical_prob, self.caption_dropout = batch_size, canonical_prob, caption_dropout
        self.device, self.split, self.wordings, self.two_object_prob = device, split, wordings, two_object_prob
        self.rng = np.random.default_rng([seed, stream])

    def __next__(self) -> dict:
        from einops import rearrange

        from t2v.data.shapes import sample_batch

        videos, captions, _ = sample_batch(self.rng, self.batch_size, self.split, self.canonical_prob, self.device,
                                          wordings=self.wordings, two_object_prob=self.two_object_prob)
        dropped = self.rng.random(len(captions)) < self.caption_dropout
        captions = ["" if drop else caption for caption, drop in zip(captions, dropped)]
        video = rearrange(videos, "b t h w c -> b c t h w").float() / 127.5 - 1.0  # (B, 3, T, H, W)
        return {"video": video, "caption": captions}

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


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
    dp_rank, dp_world = dist_info()  # data shard; the ranks of a sequence-parallel group share one
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
    groups = param_groups(params, tc)
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
        optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas))
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

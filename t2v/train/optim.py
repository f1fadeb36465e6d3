"""Optimisation: AdamW parameter groups, the warm-up + decay LR schedule, and the EMA of the weights."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from t2v.config import TrainConfig


def param_groups(params: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not on biases, norms, or modulation vectors)."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    """The one AdamW of the project; a group may carry its own "lr" and "weight_decay"."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


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

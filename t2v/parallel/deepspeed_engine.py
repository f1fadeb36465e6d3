"""DeepSpeed ZeRO (stages 1-3) through `deepspeed.initialize`, with single-file, topology-free checkpoints.

The DeepSpeed JSON (`distributed.deepspeed_config`, e.g. configs/deepspeed/zero2.json) says how to shard;
every value the typed config already knows is "auto" there and is filled from it (`fill_config`):
micro-batch size, gradient accumulation, clipping, bf16, AdamW lr / betas / weight decay. The AdamW is
the caller's (`make_optimizer`, the one the trainer builds without DeepSpeed too); a JSON that names an
"optimizer" gets DeepSpeed's with `"torch_adam": true`, so nothing is compiled for it either way.

Checkpoints stay in the trainer's format: whole fp32 master weights (`safe_get_full_fp32_param`,
gathered over ranks) and whole AdamW moments (`safe_get_full_optimizer_state`) in torch's AdamW
`state_dict` layout, so a ZeRO run resumes on another process count, or without DeepSpeed at all.
`state_tensors` yields them one tensor at a time (a sharded save keeps only its share), `full_state`
collects them all. `state_tensors`, `full_state` and `load_full_state` are collective: every rank calls them.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from t2v.config import Config

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def load_json(path: str) -> dict:
    if not Path(path).is_file():
        raise ValueError(f"distributed.deepspeed_config={path!r} does not exist")
    with open(path) as f:
        return json.load(f)


def fill_config(ds: dict, cfg: Config, world_size: int) -> dict:
    """A copy of DeepSpeed config `ds` with every "auto" filled from the typed config; checks the rest."""
    tc, dc = cfg.train, cfg.distributed
    ds = copy.deepcopy(ds)
    known = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "gradient_clipping": tc.grad_clip,
        "train_batch_size": cfg.data.batch_size * tc.grad_accum * world_size,
    }
    for key, value in known.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ValueError(f"deepspeed config {key}={ds[key]!r} disagrees with the training config ({value!r}); "
                             "set it to \"auto\"")
    for precision, enabled in (("bf16", tc.mixed_precision == "bf16"), ("fp16", tc.mixed_precision == "fp16")):
        block = ds.setdefault(precision, {})
        if block.get("enabled", "auto") == "auto":
            block["enabled"] = enabled
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", "auto") == "auto":
        zero["stage"] = dc.zero_stage
    elif zero["stage"] != dc.zero_stage:
        raise ValueError(f"distributed.zero_stage={dc.zero_stage} but the deepspeed config has stage "
                         f"{zero['stage']}; make them agree (or set the file's stage to \"auto\")")
    if dc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
        ds["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW on CPU partitions, nothing compiled
    if dc.offload_params:
        if dc.zero_stage != 3:
            raise ValueError(f"distributed.offload_params=true needs distributed.zero_stage=3, got {dc.zero_stage}")
        zero["offload_param"] = {"device": "cpu"}
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        for key, value in (("lr", tc.lr), ("betas", list(tc.betas)), ("weight_decay", tc.weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
        params.setdefault("torch_adam", True)
    ds.setdefault("steps_per_print", 10**9)
    leftover = [path for path, value in _walk(ds) if value == "auto"]
    if leftover:
        raise ValueError(f"deepspeed config keys {leftover} are \"auto\" but the trainer does not know them")
    return ds


def _walk(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def initialize(model: nn.Module, param_groups: list[dict], make_optimizer: Callable, make_scheduler: Callable,
               cfg: Config, world_size: int):
    """`deepspeed.initialize` on the finished model; returns the engine (engine.optimizer, engine.lr_scheduler).

    `param_groups` are AdamW groups of the trained parameters, in the order the trainer's checkpoints index
    them; `make_optimizer(groups)` builds the AdamW (unless the DeepSpeed config names an "optimizer"),
    `make_scheduler(optimizer)` the LR schedule on it.
    """
    import deepspeed

    dc = cfg.distributed
    if dc.zero_stage == 3 and dc.sequence_parallel_size > 1:
        raise ValueError(f"distributed.sequence_parallel_size={dc.sequence_parallel_size} with distributed.zero_stage=3: "
                         "ZeRO-3 gathers parameters in module forwards that sequence parallelism bypasses; "
                         "use zero_stage 1 or 2")
    ds = fill_config(load_json(dc.deepspeed_config) if dc.deepspeed_config else {}, cfg, world_size)
    if dc.zero_stage == 3 and cfg.train.ema_decay > 0 and ds["zero_optimization"].get("enable_sanity_checks"):
        raise ValueError("train.ema_decay > 0 with ZeRO-3 \"enable_sanity_checks\": swapping the average into the "
                         "gathered parameters for validation and export is an in-place change the checks refuse; "
                         "turn the checks off or set train.ema_decay=0")
    # Copies: torch optimizers adopt the group dicts, and ZeRO then swaps their params for flat partitions.
    param_groups = [dict(group, params=list(group["params"])) for group in param_groups]
    if "optimizer" in ds:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups, lr_scheduler=make_scheduler,
                                          config=ds)
    else:
        engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(param_groups),
                                          lr_scheduler=make_scheduler, config=ds)
    return engine


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """Torch's AdamW inside DeepSpeed's ZeRO wrapper (its params are the flat fp32 partitions)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def gathered(engine):
    """Context with whole parameters in the module on every rank (ZeRO-3 gathers them; collective)."""
    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(plain_module(engine).parameters()), modifier_rank=None)


def plain_module(engine) -> nn.Module:
    """The model the engine trains, without a `SequenceParallelDiT` around it (checkpoint names)."""
    from t2v.parallel.sequence import SequenceParallelDiT

    module = engine.module
    return module.model if isinstance(module, SequenceParallelDiT) else module


def _ordered(param_groups: list[dict]) -> list[nn.Parameter]:
    return [p for group in param_groups for p in group["params"]]


def _group_settings(group: dict) -> dict:
    """A param group's settings that a torch optimizer's `state_dict` keeps (JSON-able, no tensors)."""
    keep = {}
    for key, value in group.items():
        if key == "params":
            continue
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, (int, float, bool, str, list)) or value is None:
            keep[key] = value
    return keep


@torch.no_grad()
def _materialize_moments(engine) -> None:
    """torch's AdamW makes its state at the first step: take one with zero gradients and lr 0 (no change)
    on every flat fp32 partition (ZeRO-3 puts each into its group only for its own step)."""
    inner, zero = inner_optimizer(engine), engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        pairs = [(zero.sub_group_to_group_id[i], flat) for i, flat in enumerate(zero.fp32_partitioned_groups_flat)]
    else:
        pairs = [(i, flat) for i, group in enumerate(inner.param_groups) for flat in group["params"]]
    for group_index, flat in pairs:
        group = inner.param_groups[group_index]
        saved_params, saved_lr = group["params"], group["lr"]
        group["params"], group["lr"] = [flat], 0.0
        flat.grad = torch.zeros_like(flat)
        try:
            inner.step()
        finally:
            flat.grad = None
            group["params"], group["lr"] = saved_params, saved_lr


def _link_moments(engine) -> None:
    """ZeRO-1/2 link each parameter to its AdamW moments after the first step, but only the moments that
    exist by then: after the first param group's step. Link again now that every group has them."""
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def _gathered_one(param: torch.Tensor):
    """Context with one ZeRO-3 parameter whole on every rank (collective); nothing to do otherwise."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=None)


def _adam_step(engine) -> torch.Tensor | None:
    """AdamW's step count (the same in every flat partition), or None before the first update."""
    steps = [s["step"] for s in inner_optimizer(engine).state.values() if "step" in s]
    return torch.as_tensor(steps[0], dtype=torch.float32).clone().cpu() if steps else None


def state_tensors(engine, param_groups: list[dict]):
    """("model" | "optimizer", name, whole CPU tensor), one tensor at a time, the same sequence on every rank
    (collective: every rank runs it to the end). "model": the module's state dict with the fp32 masters of
    trained parameters; "optimizer": "{index}.{key}" as torch's AdamW `state_dict` numbers its parameters."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    module = plain_module(engine)
    ordered = _ordered(param_groups)
    trained = {id(p) for p in ordered}
    for name, value in module.state_dict(keep_vars=True).items():
        if id(value) in trained:
            whole = safe_get_full_fp32_param(value).detach().cpu().clone()
        else:
            with _gathered_one(value):
                whole = value.detach().cpu().clone()
        yield "model", name, whole
    step = _adam_step(engine)
    if step is None:
        return
    _link_moments(engine)
    for index, param in enumerate(ordered):
        for key in ADAM_KEYS:
            yield "optimizer", f"{index}.{key}", safe_get_full_optimizer_state(param, key).detach().cpu().clone()
        yield "optimizer", f"{index}.step", step.clone()


def optimizer_groups(engine, param_groups: list[dict]) -> list[dict]:
    """The AdamW param groups as torch's `state_dict` has them: settings, and parameter indices in order."""
    counts = [len(group["params"]) for group in param_groups]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [
        {**_group_settings(inner_group), "params": list(range(start, start + count))}
        for inner_group, start, count in zip(inner_optimizer(engine).param_groups, starts, counts)
    ]


def full_state(engine, param_groups: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict with fp32 master weights, torch AdamW state dict), whole, on every rank (collective)."""
    model, state = {}, {}
    for group, name, tensor in state_tensors(engine, param_groups):
        if group == "model":
            model[name] = tensor
        else:
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = tensor
    return model, {"state": state, "param_groups": optimizer_groups(engine, param_groups)}


@torch.no_grad()
def load_full_state(engine, param_groups: list[dict], model: dict[str, torch.Tensor], optimizer: dict) -> None:
    """Put fp32 master weights and AdamW moments of a trainer checkpoint into the engine's partitions.

    The module itself must already hold the checkpoint's weights (loaded before `initialize`).
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    names = {id(p): name for name, p in plain_module(engine).named_parameters()}
    ordered = _ordered(param_groups)
    inner = inner_optimizer(engine)
    state = optimizer.get("state", {})
    if state:
        _materialize_moments(engine)
        _link_moments(engine)
    for index, param in enumerate(ordered):
        device = param.device
        safe_set_full_fp32_param(param, model[names[id(param)]].to(device, torch.float32))
        if state:
            entry = state[index] if index in state else state[str(index)]
            for key in ADAM_KEYS:
                safe_set_full_optimizer_state(param, entry[key].to(device, torch.float32), key)
    if state:
        first = state[0] if 0 in state else state["0"]
        for flat_state in inner.state.values():
            flat_state["step"] = torch.as_tensor(first["step"], dtype=torch.float32).clone()
    for group, saved in zip(inner.param_groups, optimizer.get("param_groups", [])):
        for key in ("lr", "initial_lr"):
            if key in saved:
                group[key] = saved[key]

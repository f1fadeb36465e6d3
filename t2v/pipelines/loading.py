"""A pipeline folder loaded ready to sample: the one loader of generate.py, the evaluation and the app."""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from diffusers.hooks import FirstBlockCacheConfig

from t2v.generation import compile_transformer, quiet_loading, sampler_error, set_sampler
from t2v.pipelines.lora import lora_file
from t2v.pipelines.memory import MEMORY_PRESETS, apply_memory_preset
from t2v.pipelines.pipeline_t2v import T2VPipeline


def load_pipeline(model_dir: str | os.PathLike, device: str | None = None, dtype: str | None = None,
                  shift: float | None = None, solver: str | None = None, compile: bool = False,
                  memory: str = "fast", cache: float | None = None, lora: str | os.PathLike | None = None,
                  lora_scale: float = 1.0):
    """The pipeline of `model_dir` on `device` in `dtype`, ready to sample: the one loader of generate.py, the
    evaluation's generate stage and the app.

    `device` defaults to CUDA when available (under an initialised process group, "cuda" is this rank's
    current device), `dtype` ("float32", "bfloat16", "float16") to bfloat16 on CUDA and float32 on CPU, where
    float16 is refused. `shift`/`solver` replace the model's sampler (`set_sampler`); `compile` compiles the
    transformer's blocks; `memory` is a preset of `t2v.pipelines.memory` (which also places the pipeline on
    `device`); `cache` a first-block-cache threshold (None: off); `lora` a LoRA file, or a folder holding
    `pytorch_lora_weights.safetensors`, fused into the transformer's weights times `lora_scale` before the memory
    preset and compilation apply. Bad values raise ValueError naming them, before any weights are read (a LoRA
    file whose tensors fit no layer of the transformer, once it is read).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and dist.is_available() and dist.is_initialized() and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asked for but CUDA is not available")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype!r} must be float32, bfloat16 or float16")
    if dtype == "float16" and torch.device(device).type == "cpu":
        raise ValueError("--dtype float16 is not supported on CPU (about 50x slower); use float32 or bfloat16")
    if not os.path.isfile(os.path.join(model_dir, "model_index.json")):
        raise ValueError(f"model folder {os.fspath(model_dir)!r} has no model_index.json (not a diffusers "
                         "pipeline folder)")
    if error := sampler_error(shift, solver):
        raise ValueError(error)
    if memory not in MEMORY_PRESETS:
        raise ValueError(f"--memory {memory!r} is unknown; choose one of {', '.join(MEMORY_PRESETS)}")
    if cache is not None and not (math.isfinite(cache) and cache >= 0):
        raise ValueError(f"--cache {cache} must be a finite threshold >= 0")
    if lora is not None:
        lora = lora_file(lora)
    if not math.isfinite(lora_scale):
        raise ValueError(f"--lora-scale {lora_scale} must be finite")
    quiet_loading()
    pipe = T2VPipeline.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    if lora is not None:  # folded in and the LoRA layers removed: plain linears for offloading, fp8 and compile
        pipe.load_lora_weights(lora)
        pipe.fuse_lora(lora_scale=lora_scale)
        pipe.unload_lora_weights()
    apply_memory_preset(pipe, memory, device)
    if cache is not None:
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=cache))
    pipe.set_progress_bar_config(disable=True)
    set_sampler(pipe, shift, solver)
    if compile:
        compile_transformer(pipe)
    return pipe

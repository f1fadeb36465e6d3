"""Memory presets of a `T2VPipeline`: diffusers' own offloading, VAE tiling and slicing, fp8 weight storage.

    apply_memory_preset(pipe, "balanced", "cuda")

- "fast": everything resident on the device; nothing changes.
- "balanced": model CPU offload (each of text encoder, transformer and VAE is on the device only while it
  runs), VAE tiling and slicing. The same numbers as "fast": only where the weights wait changes.
- "low": the transformer stored in float8 (e4m3) and computed in its own dtype, layer by layer (layerwise
  casting); group offloading of every component (the transformer block by block, the text encoder and the
  VAE layer by layer), overlapped with compute on a CUDA stream; VAE tiling and slicing. The one preset that
  changes the video: each transformer weight is rounded to float8.

On the CPU, offloading is skipped (logged once): the weights already live in host memory, so there is no
device memory to free and moving them changes nothing. Tiling, slicing and fp8 storage still apply there and
do lower the process's resident memory. Apply a preset once, before sampling, to a pipeline not yet offloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class MemoryPreset:
    """What a preset turns on."""

    offload: str | None  # None, "model" (enable_model_cpu_offload) or "group" (apply_group_offloading)
    vae_tiling: bool  # VAE tiling and slicing
    fp8_transformer: bool  # transformer weights stored as float8_e4m3fn (layerwise casting)


MEMORY_PRESETS = {
    "fast": MemoryPreset(offload=None, vae_tiling=False, fp8_transformer=False),
    "balanced": MemoryPreset(offload="model", vae_tiling=True, fp8_transformer=False),
    "low": MemoryPreset(offload="group", vae_tiling=True, fp8_transformer=True),
}


def apply_memory_preset(pipe, name: str, device: str | torch.device) -> None:
    """Apply preset `name` (a key of MEMORY_PRESETS) to `pipe`, which samples on `device`.

    Offloading presets leave the pipeline's components on the CPU with hooks that bring them to `device` when
    they run; without offloading the pipeline is moved to `device`.
    """
    if name not in MEMORY_PRESETS:
        raise ValueError(f"memory preset {name!r} is unknown; choose one of {', '.join(MEMORY_PRESETS)}")
    preset = MEMORY_PRESETS[name]
    device = torch.device(device)

    # 1. VAE tiling and slicing (ours and diffusers' video VAEs have both)
    if preset.vae_tiling and pipe.vae is not None:
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()

    # 2. fp8 storage of the transformer's layers, computed in the dtype it was loaded in
    if preset.fp8_transformer and pipe.transformer is not None:
        compute_dtype = pipe.transformer.dtype
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)

    # 3. offloading, on an accelerator only
    if preset.offload is None or device.type == "cpu":
        if preset.offload is not None:
            logger.info(f"memory preset {name!r}: no offloading on the CPU (the weights are in host memory already)")
        pipe.to(device)
        return
    if preset.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
        return
    from diffusers.hooks import apply_group_offloading

    pipe.to("cpu")
    stream = device.type == "cuda"
    pipe.transformer.enable_group_offload(device, offload_type="block_level", num_blocks_per_group=1,
                                          use_stream=stream)
    for component in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        if component is not None:
            apply_group_offloading(component, onload_device=device, offload_type="leaf_level", use_stream=stream)


__all__ = ["MEMORY_PRESETS", "MemoryPreset", "apply_memory_preset"]

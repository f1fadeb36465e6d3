"""What the pipeline, trainer and latent cache need to know about a video VAE, ours or a diffusers one.

Each class T2V can use is described once, by a function of the loaded model (`VAE_FORMATS`): its latent grid
(temporal and spatial compression, latent channels, the frame counts it takes) and how its latents are
normalised for the transformer, in the convention of the class's own diffusers pipeline:

    normalised = (z - mean) * scale / std

with `mean`/`std` the per-channel `latents_mean`/`latents_std` of the config (Wan, Mochi) or of buffers
(LTX-Video), else `mean` our `shift_factor` (0 for the others), and `scale` the `scaling_factor` (CogVideoX,
Hunyuan Video, Mochi, LTX-Video, ours; 1 for Wan). Every described class encodes to a `latent_dist` with
`vae.encode(video)` and decodes denormalised latents with `vae.decode(z)`; a class that cannot be used so is
refused by name with what it lacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from t2v.flow import patch_dims


@dataclass(frozen=True)
class VAEFormat:
    """A video VAE's latent grid and normalisation: normalised = (z - mean) * scale / std, per channel."""

    temporal: int  # frames per latent frame after the first: a T-frame clip has 1 + (T - 1) / temporal
    spatial: int  # pixels per latent pixel, along height and width
    channels: int  # latent channels
    mean: tuple[float, ...]  # (C,)
    std: tuple[float, ...]  # (C,)
    scale: float
    # The latent frames after the first come in groups of this many, so a clip has 1 + temporal * frame_group * k
    # frames; `frame_rule` says why (CogVideoX decodes them in pairs).
    frame_group: int = 1
    frame_rule: str = ""
    decode_refusal: str = ""  # why T2VPipeline cannot decode these latents; empty when it can


def _stats(channels: int, mean, std, scale) -> dict:
    """`VAEFormat` statistics of normalised = (z - mean) * scale / std; None means 0, 1 and 1."""
    mean = [0.0] * channels if mean is None else [float(m) for m in mean]
    std = [1.0] * channels if std is None else [float(s) for s in std]
    return {"mean": tuple(mean), "std": tuple(std), "scale": 1.0 if scale is None else float(scale)}


def _causal_video_vae(vae) -> VAEFormat:  # ours: (z - shift_factor) * scaling_factor
    config = vae.config
    channels = int(config.latent_channels)
    return VAEFormat(vae.temporal_compression_ratio, vae.spatial_compression_ratio, channels,
                     **_stats(channels, [config.shift_factor] * channels, None, config.scaling_factor))


def _wan(vae) -> VAEFormat:  # WanPipeline: (z - latents_mean) / latents_std
    config = vae.config
    channels, temporal = int(config.z_dim), int(config.scale_factor_temporal)
    return VAEFormat(temporal, int(config.scale_factor_spatial), channels,
                     **_stats(channels, config.latents_mean, config.latents_std, None),
                     frame_group=math.lcm(4, temporal) // temporal,  # 1 for Wan's own 4x
                     frame_rule="AutoencoderKLWan encodes the frames after the first in chunks of 4 and drops the rest")


def _cogvideox(vae) -> VAEFormat:
    # CogVideoXPipeline: z * scaling_factor; decode_latents divides by it. (`invert_scale_latents`, CogVideoX
    # 1.5, only changes how its image-to-video transformer is given the image's latents, not the decode.) The
    # decoder turns latent frames 0-2 into 9 frames, then each later pair into 8: an even count gives 4k frames.
    config = vae.config
    channels = int(config.latent_channels)
    return VAEFormat(int(config.temporal_compression_ratio), 2 ** (len(config.block_out_channels) - 1), channels,
                     **_stats(channels, None, None, config.scaling_factor), frame_group=2,
                     frame_rule="AutoencoderKLCogVideoX decodes the latent frames after the first in pairs")


def _hunyuan_video(vae) -> VAEFormat:  # HunyuanVideoPipeline: z * scaling_factor
    config = vae.config
    channels = int(config.latent_channels)
    return VAEFormat(int(config.temporal_compression_ratio), int(config.spatial_compression_ratio), channels,
                     **_stats(channels, None, None, config.scaling_factor))


def _ltx_video(vae) -> VAEFormat:  # LTXPipeline._normalize_latents: (z - mean) * scaling_factor / std, buffers
    config = vae.config
    refusal = (
        "AutoencoderKLLTXVideo with timestep_conditioning=True (LTX-Video 0.9.1 and later) decodes at a chosen "
        "timestep with added noise (LTXPipeline's decode_timestep, decode_noise_scale), which T2VPipeline has no "
        "setting for; its latents can be cached, but sampling and training need a VAE without timestep "
        "conditioning (LTX-Video 0.9.0)"
    ) if config.timestep_conditioning else ""
    channels = int(config.latent_channels)
    mean, std = vae.get_buffer("latents_mean").tolist(), vae.get_buffer("latents_std").tolist()
    return VAEFormat(int(vae.temporal_compression_ratio), int(vae.spatial_compression_ratio), channels,
                     **_stats(channels, mean, std, config.scaling_factor), decode_refusal=refusal)


def _mochi(vae) -> VAEFormat:  # MochiPipeline: (z - latents_mean) * scaling_factor / latents_std, or z * scale
    config = vae.config
    channels = int(config.latent_channels)
    given = config.latents_mean is not None and config.latents_std is not None
    return VAEFormat(math.prod(config.temporal_expansions), math.prod(config.spatial_expansions), channels,
                     **_stats(channels, config.latents_mean if given else None, config.latents_std if given else None,
                              config.scaling_factor))


# Class name -> its format; a VAE folder names its class in config.json ("_class_name").
VAE_FORMATS: dict[str, Callable[..., VAEFormat]] = {
    "CausalVideoVAE": _causal_video_vae,
    "AutoencoderKLWan": _wan,
    "AutoencoderKLCogVideoX": _cogvideox,
    "AutoencoderKLHunyuanVideo": _hunyuan_video,
    "AutoencoderKLLTXVideo": _ltx_video,
    "AutoencoderKLMochi": _mochi,
}


def check_vae_class(class_name: str) -> None:
    """Raise ValueError unless T2V knows how to use VAEs of this class."""
    if class_name not in VAE_FORMATS:
        raise ValueError(
            f"VAE class {class_name} is not one T2V can use: its compression, frame-count rule and latent "
            f"normalisation are not described (t2v.models.vae_utils.VAE_FORMATS); known: {', '.join(VAE_FORMATS)}"
        )


def vae_format(vae) -> VAEFormat:
    """The `VAEFormat` of a loaded VAE; ValueError for a class T2V cannot use, naming what is missing."""
    class_name = type(vae).__name__
    check_vae_class(class_name)
    return VAE_FORMATS[class_name](vae)


def vae_scale_factors(vae) -> tuple[int, int]:
    """(temporal, spatial) compression of a video VAE."""
    fmt = vae_format(vae)
    return fmt.temporal, fmt.spatial


def latent_channels(vae) -> int:
    return vae_format(vae).channels


def latent_shape(vae, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, T, H, W) latents of a (frames, height, width) clip: the first frame alone, then `ft` frames per latent
    frame, and `fs` x `fs` pixels per latent pixel. Raises ValueError for a clip shape the VAE cannot take."""
    fmt = vae_format(vae)
    step = fmt.temporal * fmt.frame_group
    if frames < 1 or (frames - 1) % step:
        why = f"; {fmt.frame_rule}" if fmt.frame_group > 1 else ""
        raise ValueError(f"num_frames {frames} must be {step}k+1 for this VAE (1, {step + 1}, {2 * step + 1}, ...)"
                         f"{why}")
    for name, size in (("height", height), ("width", width)):
        if size < fmt.spatial or size % fmt.spatial:
            raise ValueError(f"{name} {size} must be a positive multiple of {fmt.spatial} (the VAE's spatial factor)")
    return fmt.channels, (frames - 1) // fmt.temporal + 1, height // fmt.spatial, width // fmt.spatial


def check_clip_shape(vae, patch_size: int | tuple[int, int, int], frames: int, height: int, width: int) -> None:
    """Raise ValueError unless a (frames, height, width) clip gives latents that patches of `patch_size`
    ((p_t, p_h, p_w), or one int p for (1, p, p)) tile and that T2VPipeline can decode: what a transformer over
    this VAE's latents can denoise, or learn from and be sampled with."""
    fmt = vae_format(vae)
    if fmt.decode_refusal:
        raise ValueError(fmt.decode_refusal)
    fs = fmt.spatial
    p_t, p_h, p_w = patch_dims(patch_size)
    for name, size, patch in (("height", height, p_h), ("width", width, p_w)):
        if size < fs * patch or size % (fs * patch):
            raise ValueError(f"{name} {size} must be a positive multiple of {fs * patch} (VAE factor {fs} x "
                             f"patch size {patch})")
    _, latent_frames, _, _ = latent_shape(vae, frames, height, width)
    if latent_frames % p_t:
        raise ValueError(f"num_frames {frames} gives {latent_frames} latent frames, not divisible by patch {p_t}")


def latent_stats(vae, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std / scale), each (1, C, 1, 1, 1): normalised latents are (z - mean) / (std / scale)."""
    fmt = vae_format(vae)
    if len(fmt.mean) != fmt.channels or len(fmt.std) != fmt.channels:
        raise ValueError(f"the VAE's latents_mean/latents_std have {len(fmt.mean)}/{len(fmt.std)} values for its "
                         f"{fmt.channels} latent channels")
    shape = (1, fmt.channels, 1, 1, 1)
    mean = torch.tensor(fmt.mean, dtype=dtype, device=device).view(shape)
    std = torch.tensor([s / fmt.scale for s in fmt.std], dtype=dtype, device=device).view(shape)
    return mean, std


def normalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) VAE latents -> what the transformer sees."""
    mean, std = latent_stats(vae, z.device, z.dtype)
    return (z - mean) / std


def denormalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """The inverse of `normalize_latents`: what `vae.decode` takes."""
    mean, std = latent_stats(vae, z.device, z.dtype)
    return z * std + mean

"""What the pipeline and trainer need to know about a video VAE, ours or a diffusers one.

Our `CausalVideoVAE` stores `scaling_factor`/`shift_factor` (normalised = (z - shift) * scale); diffusers'
`AutoencoderKLWan` stores per-channel `latents_mean`/`latents_std` (normalised = (z - mean) / std).
"""

from __future__ import annotations

import torch


def vae_scale_factors(vae) -> tuple[int, int]:
    """(temporal, spatial) compression of a video VAE."""
    if hasattr(vae, "temporal_compression_ratio") and hasattr(vae, "spatial_compression_ratio"):
        return int(vae.temporal_compression_ratio), int(vae.spatial_compression_ratio)
    config = vae.config
    if "scale_factor_temporal" in config:  # AutoencoderKLWan
        return int(config.scale_factor_temporal), int(config.scale_factor_spatial)
    if "temporal_compression_ratio" in config:  # AutoencoderKLCogVideoX
        return int(config.temporal_compression_ratio), 2 ** (len(config.block_out_channels) - 1)
    raise ValueError(f"cannot tell the compression factors of VAE class {type(vae).__name__}")


def latent_channels(vae) -> int:
    config = vae.config
    for key in ("latent_channels", "z_dim"):
        if key in config:
            return int(config[key])
    raise ValueError(f"cannot tell the latent channel count of VAE class {type(vae).__name__}")


def latent_shape(vae, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, T, H, W) latents of a (frames, height, width) clip: the first frame alone, then `ft` frames per latent
    frame, and `fs` x `fs` pixels per latent pixel. Raises ValueError for a clip shape the VAE cannot take."""
    ft, fs = vae_scale_factors(vae)
    if frames < 1 or (frames - 1) % ft:
        raise ValueError(f"num_frames {frames} must be {ft}k+1 for this VAE (1, {ft + 1}, {2 * ft + 1}, ...)")
    for name, size in (("height", height), ("width", width)):
        if size < fs or size % fs:
            raise ValueError(f"{name} {size} must be a positive multiple of {fs} (the VAE's spatial factor)")
    return latent_channels(vae), (frames - 1) // ft + 1, height // fs, width // fs


def check_clip_shape(vae, patch_size: tuple[int, int, int], frames: int, height: int, width: int) -> None:
    """Raise ValueError unless a (frames, height, width) clip gives latents that patches of `patch_size`
    (p_t, p_h, p_w) tile: what a transformer over this VAE's latents can denoise or learn from."""
    _, fs = vae_scale_factors(vae)
    p_t, p_h, p_w = patch_size
    for name, size, patch in (("height", height, p_h), ("width", width, p_w)):
        if size < fs * patch or size % (fs * patch):
            raise ValueError(f"{name} {size} must be a positive multiple of {fs * patch} (VAE factor {fs} x "
                             f"patch size {patch})")
    _, latent_frames, _, _ = latent_shape(vae, frames, height, width)
    if latent_frames % p_t:
        raise ValueError(f"num_frames {frames} gives {latent_frames} latent frames, not divisible by patch {p_t}")


def latent_stats(vae, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std), each (1, C, 1, 1, 1), such that normalised latents are (z - mean) / std."""
    config = vae.config
    channels = latent_channels(vae)
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean = torch.tensor(config.latents_mean, dtype=dtype)
        std = torch.tensor(config.latents_std, dtype=dtype)
    else:
        shift = config.get("shift_factor") or 0.0
        scale = config.get("scaling_factor") or 1.0
        mean = torch.full((channels,), float(shift), dtype=dtype)
        std = torch.full((channels,), 1.0 / float(scale), dtype=dtype)
    shape = (1, channels, 1, 1, 1)
    return mean.view(shape).to(device), std.view(shape).to(device)


def normalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    mean, std = latent_stats(vae, z.device, z.dtype)
    return (z - mean) / std


def denormalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    mean, std = latent_stats(vae, z.device, z.dtype)
    return z * std + mean

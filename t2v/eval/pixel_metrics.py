"""Pixel-level reconstruction metrics: PSNR and SSIM of images and videos in [0, data_range]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange


def psnr_from_mse(mse: float, data_range: float = 1.0) -> float:
    """PSNR in dB of a mean squared error; inf for a perfect match."""
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample; x, y (B, ...) in [0, data_range]."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse.clamp(min=1e-12))


def _gaussian_window(size: int, sigma: float, channels: int, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size)  # (C, 1, k, k)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image with a Gaussian window (Wang et al. 2004); x, y (N, C, H, W).

    The window shrinks to the largest odd size that fits images smaller than `window_size`.
    """
    _, channels, height, width = x.shape
    size = min(window_size, height, width)
    size -= 1 - size % 2  # odd
    window = _gaussian_window(size, sigma, channels, x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x, y = x.float(), y.float()

    def blur(z):
        return F.conv2d(z, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def video_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean per-frame SSIM per video; x, y (B, C, T, H, W) in [0, 1]."""
    batch = x.shape[0]
    frames = ssim(rearrange(x, "b c t h w -> (b t) c h w"), rearrange(y, "b c t h w -> (b t) c h w"))
    return rearrange(frames, "(b t) -> b t", b=batch).mean(dim=1)

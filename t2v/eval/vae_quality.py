"""How much of Shapes World a VAE keeps: attribute read-back and PSNR of reconstructions of real clips.

Everything a text-to-video model generates is decoded by its VAE, so the read-back accuracy of the VAE's own
reconstructions bounds the accuracy of generated videos.

    python examples/shapes_world/scripts/eval_shapes_vae.py --vae t2v/assets/default_model/vae --num 256
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from tqdm.auto import tqdm

from t2v.data.shapes import render_batch, sample_record
from t2v.eval.pixel_metrics import psnr_from_mse
from t2v.eval.shapes_readback import attribute_accuracy


def reconstruct(vae, videos: torch.Tensor) -> torch.Tensor:
    """uint8 clips (B, T, H, W, 3) -> uint8 reconstructions through the posterior mean, same shape."""
    param = next(vae.parameters())
    x = rearrange(videos, "b t h w c -> b c t h w").to(param.device, param.dtype) / 127.5 - 1.0
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)  # (B, 3, T, H, W)
    return ((rearrange(recon, "b c t h w -> b t h w c") + 1) * 127.5).round().to(torch.uint8).cpu()


@torch.no_grad()
def vae_readback(vae, num: int, seed: int, split: str = "train", batch_size: int = 16,
                 progress: bool = True, shape_method: str = "template") -> dict[str, float]:
    """Read-back accuracy per attribute and `all`, plus `psnr` (dB, over all pixels of all clips), of the
    reconstructions of `num` clips drawn from Shapes World `split` with `seed` (one or two objects)."""
    if num < 1 or batch_size < 1:
        raise ValueError(f"num={num} and batch_size={batch_size} must both be at least 1")
    rng = np.random.default_rng(seed)
    records = [sample_record(rng, None, split) for _ in range(num)]
    recons, squared_error, count = [], 0.0, 0
    for start in tqdm(range(0, num, batch_size), desc="vae read-back", disable=not progress):
        real = render_batch(records[start : start + batch_size])  # (B, T, H, W, 3) uint8
        recon = reconstruct(vae, real)
        squared_error += ((recon.double() - real.double()) / 255).pow(2).sum().item()
        count += real.numel()
        recons.append(recon.numpy())
    result = attribute_accuracy(np.concatenate(recons), records, shape_method)
    result["psnr"] = psnr_from_mse(squared_error / count)
    return result


__all__ = ["reconstruct", "vae_readback"]

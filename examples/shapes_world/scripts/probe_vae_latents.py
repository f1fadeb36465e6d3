"""What a VAE's latents keep of Shapes World: small probes trained on encoded one-object clips.

Encodes `--num` one-object clips (posterior mean), then trains on 80% and tests on the other 20%:
- a conv classifier on the whole latent for the object's shape and size (accuracy),
- a conv regressor on the first latent frame (the causal VAE encodes frame 0 alone) for the object's centre
  at frame 0 (mean absolute error in pixels, and the share of clips within half a pixel on both axes).
High probe accuracy with a low reconstruction read-back says the decoder loses what the latents keep.

    python examples/shapes_world/scripts/probe_vae_latents.py --vae t2v/assets/default_model/vae --num 3000 --seed 5 [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from t2v.data.shapes import SHAPES, SIZES, render_batch, sample_record
from t2v.eval.report import write_json
from t2v.models.loading import load_vae


@torch.no_grad()
def encode_clips(vae, records: list[dict], batch_size: int = 32) -> torch.Tensor:
    """Posterior means (N, C, T', h, w) of the rendered clips of `records`, fp32 on the CPU."""
    param = next(vae.parameters())
    latents = []
    for start in tqdm(range(0, len(records), batch_size), desc="encode"):
        video = render_batch(records[start : start + batch_size])  # (B, T, H, W, 3) uint8
        x = rearrange(video, "b t h w c -> b c t h w").to(param.device, param.dtype) / 127.5 - 1.0
        latents.append(vae.encode(x).latent_dist.mode().float().cpu())
    return torch.cat(latents)


def _fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, epochs: int, lr: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            loss = loss_fn(net(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    return net.eval()


def probe(latents: torch.Tensor, records: list[dict], epochs: int = 60, seed: int = 0) -> dict[str, float]:
    """Held-out probe results on latents (N, C, T', h, w) of one-object clips `records` (80/20 split)."""
    if latents.shape[0] != len(records) or len(records) < 10:
        raise ValueError(f"{latents.shape[0]} latents and {len(records)} records must match, at least 10")
    if any(len(r["objects"]) != 1 for r in records):
        raise ValueError("the probes read one-object clips only")
    n_train = int(0.8 * len(records))
    channels, (_, _, height, width) = latents.shape[1], latents.shape[1:]
    result = {"clips": len(records), "train_clips": n_train}
    for attribute, values in (("shape", list(SHAPES)), ("size", list(SIZES))):
        labels = torch.tensor([values.index(r["objects"][0][attribute]) for r in records])
        net = nn.Sequential(nn.Conv3d(channels, 64, 3, padding=1), nn.GELU(), nn.Conv3d(64, 64, 3, padding=1),
                            nn.GELU(), nn.AdaptiveMaxPool3d(1), nn.Flatten(), nn.Linear(64, len(values)))
        net = _fit(net, latents[:n_train], labels[:n_train], nn.functional.cross_entropy, epochs, 2e-3, seed)
        with torch.no_grad():
            result[f"{attribute}_accuracy"] = (net(latents[n_train:]).argmax(-1) == labels[n_train:]).float().mean().item()
    first = latents[:, :, 0]  # (N, C, h, w): frame 0 alone
    centres = torch.tensor([r["objects"][0]["start"] for r in records], dtype=torch.float32)
    mean = centres[:n_train].mean(0)
    net = nn.Sequential(nn.Conv2d(channels, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
                        nn.Flatten(), nn.Linear(64 * height * width, 256), nn.GELU(), nn.Linear(256, 2))
    net = _fit(net, first[:n_train], centres[:n_train] - mean, nn.functional.mse_loss, int(2.5 * epochs), 1e-3, seed)
    with torch.no_grad():
        error = (net(first[n_train:]) + mean - centres[n_train:]).abs()  # (N_test, 2) pixels
    result.update(position_mae_x=error[:, 0].mean().item(), position_mae_y=error[:, 1].mean().item(),
                  position_within_half_pixel=(error < 0.5).all(1).float().mean().item())
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, help="VAE folder (save_pretrained) or a config name")
    parser.add_argument("--num", type=int, default=3000, help="one-object clips (80%% train, 20%% test)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60, help="classifier epochs (the regressor runs 2.5x)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if args.num < 10 or args.epochs < 1:
        parser.error(f"--num {args.num} must be at least 10 and --epochs {args.epochs} at least 1")
    vae = load_vae(args.vae, seed=0).eval().float()  # shipped weights are fp16; fp16 on CPU is very slow
    rng = np.random.default_rng(args.seed)
    records = [sample_record(rng, 1, "train") for _ in range(args.num)]
    result = {"vae": args.vae, "seed": args.seed, **probe(encode_clips(vae, records), records, args.epochs)}
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

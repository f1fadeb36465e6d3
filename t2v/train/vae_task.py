"""The VAE task: reconstruction + temporal-difference (+ spatial-gradient, hard-pixel) + KL, on video and
1-frame (image) batches.

Reports PSNR and SSIM on held-out clips; at the end sets `scaling_factor` / `shift_factor` from the
latents of a few batches (normalised latents get zero mean and unit std) and saves the VAE with
`save_pretrained` to `{output_dir}/vae/`.

    python scripts/train_vae.py --config examples/shapes_world/configs/shapes_vae.yaml
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from t2v.config import Config
from t2v.data.manifest import load_manifest
from t2v.data.streams import HELD_OUT_STREAM, STATS_STREAM, manifest_stream, next_readable, shapes_stream
from t2v.eval.pixel_metrics import psnr, video_ssim
from t2v.models.loading import load_vae
from t2v.parallel.distributed import data_parallel_info
from t2v.runtime import pick_device, seed_everything
from t2v.train import trainer
from t2v.train.export import save_atomically

# ----------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------


def hard_pixel_error(recon: torch.Tensor, x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean absolute error over the worst `fraction` of pixels of each sample (errors summed over channels)."""
    error = (recon - x).abs().sum(dim=1).flatten(1)  # (B, T*H*W)
    k = max(1, int(round(fraction * error.shape[1])))
    return error.topk(k, dim=1).values.mean()


def detail_error(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Absolute error weighted by the squared Laplacian of the target, per frame; (B, C, T, H, W) inputs.

    The weight is the square of the channel-summed absolute 4-neighbour Laplacian of the target (detached data,
    never the prediction). On a two-level image it grows with the square of how many neighbours differ: an
    isolated pixel weighs 16 times a pixel on a straight edge, a one-pixel tip or nub (3 differing neighbours) 9
    times, a corner 4 times, flat areas nothing; it also grows with the contrast. Frame borders are replicated,
    so outside the frame counts as equal to the pixel. The weights are normalised to mean 1 over the whole batch
    (a flat batch gives 0), and the error is summed over channels, so a uniform error e per channel costs 3e.
    """
    target = rearrange(x.float(), "b c t h w -> (b t) c h w")
    padded = F.pad(target, (1, 1, 1, 1), mode="replicate")
    laplacian = (4 * target - padded[..., :-2, 1:-1] - padded[..., 2:, 1:-1]
                 - padded[..., 1:-1, :-2] - padded[..., 1:-1, 2:])  # (BT, C, H, W)
    weight = laplacian.abs().sum(dim=1, keepdim=True).pow(2)  # (BT, 1, H, W)
    weight = weight / weight.mean().clamp_min(1e-8)
    error = (rearrange(recon.float(), "b c t h w -> (b t) c h w") - target).abs().sum(dim=1, keepdim=True)
    return (weight * error).mean()


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over elements of KL(N(mean, exp(logvar)) || N(0, 1))."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


# ----------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------


class VAETask:
    """Model, data and loss of VAE training; `trainer.train` runs it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = pick_device()
        rank, world_size = data_parallel_info()
        seed = cfg.train.seed
        seed_everything(seed)
        self.model: nn.Module = load_vae(cfg.model.vae, seed).to(self.device)
        # Image batches: a random frame of each clip of a Shapes World batch, drawn from this generator.
        self.rng = np.random.default_rng([seed, rank, 1])

        data = cfg.data
        if data.source == "manifest":
            if not data.manifest:
                raise ValueError("data.source='manifest' needs data.manifest=PATH (a CSV/JSONL with a path column)")
            rows = load_manifest(data.manifest, columns=dict(data.columns))
            train_rows, held_out = self._split_rows(rows)
            self.dataset, self.stream = manifest_stream(cfg, train_rows, 0.0, rank, world_size)
            eval_dataset, eval_stream = manifest_stream(cfg, held_out, 0.0, 0, 1)
            self.eval_batches = [next_readable(eval_stream, eval_dataset, self.cfg.data.manifest)["video"]
                                 for _ in range(cfg.vae_loss.eval_batches)]
        elif data.source == "shapes":
            self.dataset = None
            self.stream = shapes_stream(cfg, rank, self.device)
            held = shapes_stream(cfg, HELD_OUT_STREAM, self.device)
            self.eval_batches = [next(held)["video"] for _ in range(cfg.vae_loss.eval_batches)]
        else:
            raise ValueError(f"data.source={data.source!r}: the VAE trains on pixels, use 'manifest' or 'shapes'")

    def _split_rows(self, rows: list[dict]) -> tuple[list[dict], list[dict]]:
        """(training rows, held-out rows): the last eval_batches * batch_size rows are held out."""
        n_eval = self.cfg.vae_loss.eval_batches * self.cfg.data.batch_size
        if len(rows) <= n_eval:
            raise ValueError(
                f"manifest has {len(rows)} rows; holding out vae_loss.eval_batches * data.batch_size = {n_eval} "
                "for PSNR/SSIM needs more"
            )
        return rows[:-n_eval], rows[-n_eval:]

    # ------------------------------------------------------------------ batches and loss
    def next_batch(self) -> dict:
        if self.dataset is not None:
            return next_readable(self.stream, self.dataset, self.cfg.data.manifest)
        batch = next(self.stream)
        crop = self.cfg.data.crop_frames
        if crop and batch["video"].shape[2] > crop:  # a random window of `crop` frames, the same for the batch
            start = int(self.rng.integers(0, batch["video"].shape[2] - crop + 1))
            batch = {**batch, "video": batch["video"][:, :, start : start + crop]}
        if self.rng.random() < self.cfg.data.image_batch_prob:  # joint image training: one frame per clip
            video = batch["video"]
            frame = torch.as_tensor(self.rng.integers(0, video.shape[2], video.shape[0]), device=video.device)
            batch = {**batch, "video": video[torch.arange(video.shape[0]), :, frame].unsqueeze(2)}  # (B, 3, 1, H, W)
        return batch

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> trainer.StepOutput:
        lc = self.cfg.vae_loss
        x = batch["video"].to(self.device)  # (B, 3, T, H, W) in [-1, 1]
        posterior = model.encode(x).latent_dist
        z = posterior.sample(generator)  # (B, C, T', H', W')
        recon = model.decode(z).sample.float()  # (B, 3, T, H, W)
        distance = F.l1_loss if lc.reconstruction == "l1" else F.mse_loss
        reconstruction = distance(recon, x)
        if x.shape[2] > 1:  # motion: match frame-to-frame differences
            temporal = distance(recon.diff(dim=2), x.diff(dim=2))
        else:
            temporal = torch.zeros((), device=x.device)
        if lc.spatial_weight > 0:  # edges: match horizontal and vertical pixel differences
            spatial = distance(recon.diff(dim=-1), x.diff(dim=-1)) + distance(recon.diff(dim=-2), x.diff(dim=-2))
        else:
            spatial = torch.zeros((), device=x.device)
        kl = gaussian_kl(posterior.mean, posterior.logvar)
        hard = hard_pixel_error(recon, x, lc.hard_pixel_fraction) if lc.hard_pixel_weight > 0 else torch.zeros(
            (), device=x.device)
        detail = detail_error(recon, x) if lc.detail_weight > 0 else torch.zeros((), device=x.device)
        loss = (reconstruction + lc.temporal_weight * temporal + lc.spatial_weight * spatial + lc.kl_weight * kl
                + lc.hard_pixel_weight * hard + lc.detail_weight * detail)
        _, _, frames, height, width = z.shape
        return trainer.StepOutput(
            loss=loss,
            samples=x.shape[0],
            tokens=x.shape[0] * frames * height * width,
            metrics={"reconstruction": reconstruction.item(), "temporal": temporal.item(),
                     "spatial": spatial.item(), "kl": kl.item(),
                     "hard_pixel": hard.item(), "detail": detail.item(),
                     "image_batch": float(x.shape[2] == 1)},
        )

    # ------------------------------------------------------------------ state, validation, export
    def state_dict(self) -> dict:
        return {"data": self.stream.state_dict(), "image_rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["data"])
        self.rng.bit_generator.state = state["image_rng"]

    def validate(self, model: nn.Module, step: int) -> dict[str, float]:
        """PSNR (dB) and SSIM of posterior-mean reconstructions of the held-out clips."""
        psnrs, ssims = [], []
        for video in self.eval_batches:
            x = video.to(self.device)
            recon = model.decode(model.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
            x01, recon01 = (x.float() + 1) / 2, (recon + 1) / 2
            psnrs.append(psnr(x01, recon01))
            ssims.append(video_ssim(x01, recon01))
        return {"val_psnr": torch.cat(psnrs).mean().item(), "val_ssim": torch.cat(ssims).mean().item()}

    def latent_samples(self, model: nn.Module) -> torch.Tensor:
        """Posterior samples of `vae_loss.stats_batches` batches as (C, N) per latent channel."""
        data = self.cfg.data
        if self.dataset is not None:
            rank, world_size = data_parallel_info()
            _, stream = manifest_stream(self.cfg, self.dataset.rows, 0.0, rank, world_size)
            batches = (next_readable(stream, self.dataset, data.manifest)["video"]
                       for _ in range(self.cfg.vae_loss.stats_batches))
        else:
            stream = shapes_stream(self.cfg, STATS_STREAM, self.device)
            batches = (next(stream)["video"] for _ in range(self.cfg.vae_loss.stats_batches))
        generator = torch.Generator(self.device).manual_seed(self.cfg.train.seed)
        latents = [model.encode(v.to(self.device)).latent_dist.sample(generator).float() for v in batches]
        return torch.cat([rearrange(z, "b c t h w -> c (b t h w)") for z in latents], dim=1)

    def export(self, model: nn.Module) -> None:
        """Set the latent normalisation from data, then save_pretrained to {output_dir}/vae (atomically).

        With a frozen encoder (a decoder fine-tune, `model.trainable=[decoder]`) the latents and so their
        normalisation are those of the loaded VAE and are kept as they are, bit for bit.
        """
        encoder = getattr(model, "encoder", None)
        frozen = encoder is not None and not any(p.requires_grad for p in encoder.parameters())
        if not frozen:
            z = self.latent_samples(model)  # (C, N)
            if "latents_mean" in model.config:  # diffusers AutoencoderKLWan: per-channel statistics
                model.register_to_config(latents_mean=z.mean(dim=1).tolist(), latents_std=z.std(dim=1).tolist())
            else:
                model.register_to_config(shift_factor=z.mean().item(), scaling_factor=1.0 / z.std().item())
        save_atomically(model, os.path.join(self.cfg.output_dir, "vae"))


def train_vae(cfg: Config) -> trainer.TrainState:
    """Build the VAE task from `cfg` and train it."""
    return trainer.train(cfg, VAETask(cfg))

"""The DiT task: flow matching on VAE latents of videos, conditioned on frozen text embeddings.

Data sources (`data.source`):
    manifest  decode clips, encode them with the frozen VAE and text encoder on the fly
    cache     sample latents from cached posteriors, use cached text (dropout -> cached "" embedding)
    shapes    in-memory Shapes World batches, encoded on the fly

With `data.condition_frames` (and a DiT with frame_conditioning) some samples are given their first latent
frame or first k latent frames, whatever the source; the loss covers the other frames.

    python scripts/train.py --config configs/train/debug.yaml data.manifest=clips.csv
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from t2v.config import Config
from t2v.data.manifest import load_manifest
from t2v.data.streams import LoaderStream, manifest_stream, next_readable, shapes_stream
from t2v.flow import first_frames_mask, flow_matching_loss, flow_shift, num_tokens
from t2v.models.dit import frame_conditioned_input
from t2v.models.loading import build_model, load_vae
from t2v.models.text_encoder import TextEmbedder, TextEmbeddings, text_encoder_dtype
from t2v.models.vae_utils import check_clip_shape, latent_channels, latent_shape, normalize_latents
from t2v.parallel.distributed import data_parallel_info
from t2v.runtime import pick_device, seed_everything
from t2v.train import trainer
from t2v.train.conditioning import sample_given_frames
from t2v.train.export import build_pipeline, export_pipeline
from t2v.train.trainable import freeze


class DiTTask:
    """Models, data and loss of DiT training; `trainer.train` runs it."""

    def __init__(self, cfg: Config):
        from t2v.models.dit import VideoDiT

        self.cfg = cfg
        self.device = pick_device()
        self.scorer = None  # loaded at the first validation that needs it
        rank, world_size = data_parallel_info()
        seed = cfg.train.seed
        seed_everything(seed)

        # 1. frozen VAE and text encoder (the cache path still needs them for validation and export)
        self.vae = freeze(load_vae(cfg.model.vae, seed)).to(self.device)
        if hasattr(self.vae, "use_framewise_encoding"):  # training clips are short: encode in one pass
            self.vae.use_framewise_encoding = False
        self.text = freeze(
            TextEmbedder.from_pretrained(
                cfg.model.text_encoder, cfg.model.text_encoder_2 or None, max_length=cfg.model.max_text_length,
                dtype=text_encoder_dtype(cfg.model.text_encoder_dtype, self.device),
            )
        ).to(self.device)

        # 2. the transformer, checked against what feeds it
        self.model: nn.Module = build_model(VideoDiT, cfg.model.dit, "dit", seed).to(self.device)
        config = self.model.config
        if config.in_channels != latent_channels(self.vae):
            raise ValueError(f"DiT in_channels={config.in_channels} != VAE latent channels {latent_channels(self.vae)}")
        if config.text_dim != self.text.dim:
            raise ValueError(f"DiT text_dim={config.text_dim} != text encoder dim {self.text.dim}")
        if config.pooled_dim not in (0, self.text.pooled_dim):
            raise ValueError(f"DiT pooled_dim={config.pooled_dim} != text encoder pooled dim {self.text.pooled_dim}")
        self.use_pooled = config.pooled_dim > 0
        for bucket in cfg.data.buckets or [cfg.data]:
            check_clip_shape(self.vae, config.patch_size, bucket.frames, bucket.height, bucket.width)
        self._check_frame_conditioning()

        # 3. data
        data = cfg.data
        if data.source == "manifest":
            if not data.manifest:
                raise ValueError("data.source='manifest' needs data.manifest=PATH (a CSV/JSONL with path, caption)")
            rows = load_manifest(data.manifest, columns=dict(data.columns))
            self.dataset, self.stream = manifest_stream(cfg, rows, data.caption_dropout, rank, world_size)
        elif data.source == "cache":
            self.dataset, self.stream = self._cache_stream(rank, world_size)
            self.empty = {k: v.to(self.device) for k, v in self.dataset.cache.empty_caption().items()}
        else:
            self.dataset = None
            self.stream = shapes_stream(cfg, rank, self.device, data.caption_dropout)

    def _check_frame_conditioning(self) -> None:
        """Given frames need a frame-conditioned DiT and clips long enough to leave a frame to generate."""
        cfg, config = self.cfg, self.model.config
        given = cfg.data.condition_frames
        if given.enabled and not config.frame_conditioning:
            raise ValueError(
                f"data.condition_frames gives frames, but model.dit={cfg.model.dit!r} has no frame_conditioning; "
                f"convert it with t2v.models.dit.add_frame_conditioning or set frame_conditioning: true in its YAML"
            )
        if given.extend_prob > 0:
            for bucket in cfg.data.buckets or [cfg.data]:
                frames = latent_shape(self.vae, bucket.frames, bucket.height, bucket.width)[1]
                if 1 < frames <= given.extend_max:
                    raise ValueError(
                        f"data.condition_frames.extend_max={given.extend_max} leaves no latent frame to generate in "
                        f"{bucket.frames}-frame clips ({frames} latent frames); use at most {frames - 1}"
                    )
        if config.frame_conditioning and (cfg.train.validation_prompts or cfg.train.validation_shapes):
            raise ValueError("train.validation_prompts and train.validation_shapes sample with T2VPipeline, which "
                             "takes no frame-conditioned DiT; leave them empty")

    def _cache_stream(self, rank: int, world_size: int):
        from t2v.data.buckets import Bucket, BucketBatchSampler
        from t2v.data.cache import LatentCache, LatentCacheDataset, make_fingerprint, vae_fingerprint

        data = self.cfg.data
        if not data.cache:
            raise ValueError("data.source='cache' needs data.cache=FOLDER (made by scripts/precompute.py)")
        if data.manifest:
            expected = make_fingerprint(self.vae, self.text, data.manifest, data.frames, data.height, data.width,
                                        data.fps)
        else:  # no manifest to hash: still refuse latents of another VAE, text encoder or clip shape
            expected = dataclasses.replace(LatentCache(data.cache).fingerprint, vae=vae_fingerprint(self.vae),
                                           text_encoder=self.text.fingerprint(), frames=data.frames,
                                           height=data.height, width=data.width)
        dataset = LatentCacheDataset(data.cache, expected)
        bucket = Bucket(frames=data.frames, height=data.height, width=data.width, batch_size=data.batch_size)
        sampler = BucketBatchSampler([0] * len(dataset), [bucket], seed=self.cfg.train.seed, rank=rank,
                                     world_size=world_size)
        return dataset, LoaderStream(dataset, sampler, None, data.num_workers, self.cfg.train.seed)

    # ------------------------------------------------------------------ batches and loss
    def next_batch(self) -> dict:
        if self.cfg.data.source == "manifest":
            return next_readable(self.stream, self.dataset, self.cfg.data.manifest)
        return next(self.stream)

    @torch.no_grad()
    def encode(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, TextEmbeddings]:
        """Normalised clean latents x0 (B, C, T', H', W') in fp32 and the text embeddings of a batch."""
        if self.cfg.data.source == "cache":
            from t2v.data.cache import sample_latent

            mean, logvar = batch["latent_mean"].to(self.device), batch["latent_logvar"].to(self.device)
            z = sample_latent(mean, logvar, generator)  # (B, C, T', H', W')
            text = TextEmbeddings(batch["text_states"].to(self.device), batch["text_mask"].to(self.device),
                                  batch["pooled"].to(self.device))
            # Caption dropout: swap in the cached embedding of "".
            drop = torch.rand(z.shape[0], generator=generator, device=self.device) < self.cfg.data.caption_dropout
            if drop.any():
                text = TextEmbeddings(*(
                    torch.where(drop.view(-1, *[1] * (value.ndim - 1)), self.empty[key].to(value.dtype), value)
                    for key, value in (("text_states", text.states), ("text_mask", text.mask), ("pooled", text.pooled))
                ))
        else:
            video = batch["video"].to(self.device, self.vae.dtype)  # (B, 3, T, H, W) in [-1, 1]
            z = self.vae.encode(video).latent_dist.sample(generator)  # (B, C, T', H', W')
            text = self.text(batch["caption"])
        return normalize_latents(self.vae, z.float()), text

    def given_frames_mask(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """(B, 1, T', 1, 1) bool, True on the latent frames of x0 given clean; None for an unconditioned DiT."""
        if not self.model.config.frame_conditioning:
            return None
        batch, _, frames = x0.shape[:3]
        given = sample_given_frames(batch, frames, self.cfg.data.condition_frames, generator)
        return first_frames_mask(given.to(x0.device), frames)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> trainer.StepOutput:
        x0, text = self.encode(batch, generator)
        tokens = num_tokens(x0.shape[2:], self.model.config.patch_size)
        shift = flow_shift(tokens, self.cfg.flow)  # the sampler's shift for this clip shape too
        frame_mask = self.given_frames_mask(x0, generator)

        def velocity(x_t, timestep, states, mask, pooled):
            if frame_mask is not None:
                x_t = frame_conditioned_input(x_t, frame_mask)  # (B, C + 1, T', H', W')
            return model(x_t, timestep, states, mask, pooled).sample

        flow = self.cfg.flow
        loss = flow_matching_loss(
            velocity, x0, text.states, text.mask, text.pooled if self.use_pooled else None,
            shift=shift, logit_mean=flow.logit_mean, logit_std=flow.logit_std, generator=generator,
            frame_mask=frame_mask,
        )  # fmt: skip
        return trainer.StepOutput(loss=loss, samples=x0.shape[0], tokens=x0.shape[0] * tokens, metrics={"shift": shift})

    # ------------------------------------------------------------------ state, validation, export
    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def validate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Sample the validation prompts (fixed seeds) into {output_dir}/samples/step-N/; Shapes World read-back."""
        from t2v.generation import GenerationSettings, generate_to_folder

        prompts = list(self.cfg.train.validation_prompts)
        if not prompts and not self.cfg.train.validation_shapes:
            return {}
        pipe = build_pipeline(self.cfg, model, self.vae, self.text)
        pipe.set_progress_bar_config(disable=True)
        metrics = {}
        if self.cfg.train.validation_shapes:  # template read-back per category of the Shapes World prompts
            from t2v.eval.shapes_eval import readback_metrics

            rates = readback_metrics(pipe, self.cfg.train.validation_shapes)
            metrics.update({f"val/shapes/{key}": rate for key, rate in rates.items()})
        if not prompts:
            return metrics
        out_dir = os.path.join(self.cfg.output_dir, "samples", f"step-{step}")
        rows = generate_to_folder(pipe, prompts, out_dir, seeds=list(range(len(prompts))),
                                  settings=GenerationSettings(format="mp4"), progress=False,
                                  overwrite=True)  # the run's own folder: a resumed run validates the step again
        metrics["validation_videos"] = len(prompts)
        if self.cfg.train.validation_scorer:
            metrics.update(self._retrieval_metrics(prompts, [os.path.join(out_dir, r["path"]) for r in rows]))
        return metrics

    def _retrieval_metrics(self, prompts: list[str], paths: list[str]) -> dict[str, float]:
        """Score the written validation videos against their prompts (R@K, MedR, MnR both ways)."""
        import imageio.v3 as iio

        from t2v.eval.retrieval import retrieval_metrics, same_prompt_matches
        from t2v.eval.scorers import load_scorer

        if self.scorer is None:
            self.scorer = load_scorer(self.cfg.train.validation_scorer, device=self.device)
        videos = [iio.imread(path, plugin="pyav") for path in paths]  # uint8 (F, H, W, 3) each
        with torch.no_grad():
            sim = self.scorer.similarity(prompts, videos).float().cpu().numpy()
        # A repeated prompt matches every video made from it, not only its own.
        metrics = retrieval_metrics(sim, text_to_video=same_prompt_matches(prompts))
        return {f"val/{k}": float(v) for k, v in metrics.items()}

    def export(self, model: nn.Module) -> None:
        export_pipeline(self.cfg, model, self.vae, self.text, os.path.join(self.cfg.output_dir, "pipeline"))


def train_dit(cfg: Config) -> trainer.TrainState:
    """Build the DiT task from `cfg` and train it."""
    return trainer.train(cfg, DiTTask(cfg))

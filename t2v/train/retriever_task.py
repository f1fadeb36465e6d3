"""The retriever task: the video-text dual encoder of `t2v.eval.retriever`, trained with a symmetric InfoNCE
loss by the shared loop (checkpoints, exact resume, DDP, EMA, metrics.jsonl).

    python scripts/train_retriever.py --config examples/shapes_world/configs/shapes_retriever.yaml train.max_steps=100
    # writes output_dir/{config.yaml, metrics.jsonl, checkpoints/, model/}

Data sources (`data.source`):
    shapes    in-memory Shapes World batches (captions mix canonical ones and paraphrases); validation on
              held-out pairs with canonical captions and with evaluation paraphrases
    manifest  (path, caption) rows through the shape buckets, images being 1-frame videos (they need a 1-frame
              bucket); validation on `data.eval_manifest` when it is set

Captions of the same content are positives for each other, never negatives: equal canonical captions (Shapes
World's, or a manifest's `canonical_caption` column), else equal captions.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
from einops import rearrange
from torch import nn

from t2v.config import Config, RetrieverConfig, TrainConfig
from t2v.data.manifest import load_manifest
from t2v.data.streams import manifest_dataset, manifest_stream, next_readable, shapes_stream
from t2v.eval.retrieval import retrieval_metrics, same_prompt_matches
from t2v.eval.retriever import VideoEncoder, VideoTextRetriever, contrastive_loss
from t2v.parallel.distributed import data_parallel_info
from t2v.runtime import pick_device, seed_everything
from t2v.train import trainer
from t2v.train.export import save_atomically

ADAMW_EPS = 1e-6  # CLIP's


def build_retriever(cfg: RetrieverConfig) -> VideoTextRetriever:
    encoder = VideoEncoder(
        sample_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        max_frames=cfg.max_frames,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        embed_dim=cfg.embed_dim,
    )
    return VideoTextRetriever(
        encoder,
        text_encoder=cfg.text_encoder,
        text_head_hidden=cfg.text_head_hidden,
        text_trainable_layers=cfg.text_trainable_layers,
        max_text_length=cfg.max_text_length,
    )


def trainable_prefixes(model: VideoTextRetriever) -> list[str]:
    """Parameter-name prefixes of what the retriever trains: the video encoder, the text head, the temperature,
    and the sentence encoder's last `text_trainable_layers` layers."""
    num_layers = len(model.text_encoder.encoder.layer)
    text = [f"text_encoder.encoder.layer.{i}." for i in range(num_layers - model.text_trainable_layers, num_layers)]
    return ["video_encoder.", "text_head.", "logit_scale", *text]


def param_groups(params: list[tuple[str, nn.Parameter]], cfg: TrainConfig, text_lr: float) -> list[dict]:
    """AdamW groups: matrices decay; norms, biases, position embeddings, the CLS token and the logit scale do not;
    fine-tuned sentence-encoder layers train at `text_lr`."""
    decay, no_decay, text = [], [], []
    for name, param in params:
        if name.startswith("text_encoder."):
            text.append(param)
        elif param.ndim >= 2 and "pos_" not in name and "cls_token" not in name:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "eps": ADAMW_EPS},
        {"params": no_decay, "weight_decay": 0.0, "eps": ADAMW_EPS},
    ]
    if text:
        groups.append({"params": text, "weight_decay": cfg.weight_decay, "lr": text_lr, "eps": ADAMW_EPS})
    return groups


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, 3), exact for pixels that came from uint8."""
    return rearrange(((video + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8), "b c t h w -> b t h w c")


def group_ids(keys: list[str], device) -> torch.Tensor:
    """Equal strings -> equal integer ids `(B,)`."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(key, len(ids)) for key in keys], device=device)


def in_batch_accuracy(text_emb: torch.Tensor, video_emb: torch.Tensor, groups: torch.Tensor) -> float:
    """Share of texts whose most similar video in the batch has the same content (text-to-video R@1)."""
    best = (text_emb @ video_emb.T).argmax(1)
    return (groups[best] == groups).float().mean().item()


class RetrieverTask:
    """Model, data and loss of retriever training; `trainer.train(task.cfg, task)` runs it.

    `task.cfg` is the given config with `model.trainable` resolved to the retriever's trainable parameters
    (`trainable_prefixes`), which the loop reads.
    """

    def __init__(self, cfg: Config):
        data = cfg.data
        if data.source not in ("shapes", "manifest"):
            raise ValueError(f"data.source={data.source!r}: the retriever trains on pixels, use 'manifest' or 'shapes'")
        if cfg.model.trainable or cfg.model.lora_rank:
            raise ValueError(f"model.trainable={list(cfg.model.trainable)}, model.lora_rank={cfg.model.lora_rank}: the "
                             "retriever trains its video encoder, text head and temperature, and "
                             "retriever.text_trainable_layers sentence-encoder layers; leave both unset")
        if cfg.distributed.sequence_parallel_size > 1:
            raise ValueError(f"distributed.sequence_parallel_size={cfg.distributed.sequence_parallel_size}: the "
                             "retriever's clips are short, it trains data-parallel only; set it to 1")
        batch_sizes = [bucket.batch_size for bucket in data.buckets] or [data.batch_size]
        if min(batch_sizes) < 2:
            raise ValueError(f"batch sizes {batch_sizes} must be >= 2: the other pairs of a batch are the negatives")
        self.device = pick_device()
        rank, world_size = data_parallel_info()
        if cfg.distributed.backend == "ddp" and world_size > 1 and any(b.frames == 1 for b in data.buckets or [data]):
            raise ValueError("a 1-frame bucket (images) leaves the temporal attention without gradients, which DDP "
                             "refuses; train on images with one process, or drop the 1-frame bucket")
        seed_everything(cfg.train.seed)

        # 1. the model, and what of it trains
        self.model: VideoTextRetriever = build_retriever(cfg.retriever).to(self.device)
        self.cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                      trainable=trainable_prefixes(self.model)))
        self.trained = {name for name, p in self.model.named_parameters() if p.requires_grad}

        # 2. data (caption dropout would only add empty captions) and the held-out pairs of validation
        if data.source == "manifest":
            if not data.manifest:
                raise ValueError("data.source='manifest' needs data.manifest=PATH (a CSV/JSONL with path, caption)")
            rows = load_manifest(data.manifest, columns=dict(data.columns))
            self.dataset, self.stream = manifest_stream(cfg, rows, 0.0, rank, world_size)
            self.eval_sets = {"manifest": self._manifest_pairs()} if data.eval_manifest else {}
        else:
            from t2v.eval.shapes_eval import retrieval_pairs

            self.dataset = None
            self.stream = shapes_stream(cfg, rank, self.device)
            size = cfg.retriever.eval_size
            self.eval_sets = {"canonical": retrieval_pairs(size, cfg.train.seed, canonical=True),
                              "paraphrase": retrieval_pairs(size, cfg.train.seed, canonical=False)}

    def _manifest_pairs(self) -> tuple[list[np.ndarray], list[str]]:
        """The first `retriever.eval_size` readable rows of `data.eval_manifest`, clips from their beginning."""
        data = self.cfg.data
        dataset = manifest_dataset(self.cfg, load_manifest(data.eval_manifest, columns=dict(data.columns)),
                                   start=None)
        clips, captions = [], []
        for index, bucket in enumerate(dataset.bucket_ids):
            item = dataset[index] if bucket is not None else None
            if isinstance(item, dict):  # else unreadable, or no bucket fits it
                clips.append(to_uint8(item["video"][None])[0].numpy())  # (T, H, W, 3)
                captions.append(item["caption"])
            if len(clips) == self.cfg.retriever.eval_size:
                break
        if not clips:
            raise ValueError(f"data.eval_manifest={data.eval_manifest!r} has no readable row that fits a bucket")
        return clips, captions

    # ------------------------------------------------------------------ batches and loss
    def next_batch(self) -> dict:
        if self.dataset is not None:
            batch = next_readable(self.stream, self.dataset, self.cfg.data.manifest)
            rows = [self.dataset.rows[i] for i in batch["index"].tolist()]
            return {**batch, "canonical_caption": [row.get("canonical_caption") or row["caption"] for row in rows]}
        return next(self.stream)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> trainer.StepOutput:
        retriever = self.model  # `model` may be its DDP wrapper: the forward goes through it
        with torch.autocast(self.device.type, enabled=False):  # fp32 sentence features, as cached and as scored
            features = retriever.sentence_features(batch["caption"])  # (B, text_dim)
        pixels = retriever.preprocess(to_uint8(batch["video"]))  # (B, 3, T', S, S), T' <= max_frames
        text_emb, video_emb = model(pixels, features)  # (B, D) each, L2-normalised
        groups = group_ids(batch["canonical_caption"], self.device)
        loss = contrastive_loss(text_emb, video_emb, retriever.logit_scale, groups)
        batch_size, _, frames, height, width = pixels.shape
        patch = retriever.video_encoder.config.patch_size
        return trainer.StepOutput(
            loss=loss,
            samples=batch_size,
            tokens=batch_size * frames * (height // patch) * (width // patch),
            metrics={"batch_t2v_acc": in_batch_accuracy(text_emb.detach(), video_emb.detach(), groups),
                     "logit_scale": retriever.logit_scale.exp().item()},
        )

    # ------------------------------------------------------------------ optimiser hooks
    def param_groups(self, params: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> list[dict]:
        names = {name for name, _ in params}
        if names != self.trained:
            raise ValueError(f"the loop trains {len(names)} retriever parameters, not the retriever's own "
                             f"{len(self.trained)}; run it as trainer.train(task.cfg, task)")
        return param_groups(params, cfg, self.cfg.retriever.text_lr)

    def after_update(self, model: VideoTextRetriever) -> None:
        model.clamp_logit_scale()

    # ------------------------------------------------------------------ state, validation, export
    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def validate(self, model: VideoTextRetriever, step: int) -> dict[str, float]:
        """R@K, MedR and MnR both ways on the held-out pairs; a caption matches every video of an equal caption."""
        metrics = {}
        with torch.autocast(self.device.type, enabled=False):  # in fp32, as the exported model is scored
            for name, (videos, captions) in self.eval_sets.items():
                sim = model.similarity(captions, list(videos))
                for key, value in retrieval_metrics(sim, same_prompt_matches(captions)).items():
                    metrics[f"val/{name}/{key}"] = float(value)
        return metrics

    def export(self, model: VideoTextRetriever) -> None:
        save_atomically(model, os.path.join(self.cfg.output_dir, "model"))


def train_retriever(cfg: Config) -> trainer.TrainState:
    """Build the retriever task from `cfg` and train it."""
    task = RetrieverTask(cfg)
    return trainer.train(task.cfg, task)

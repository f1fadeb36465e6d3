"""Training of the video-text retriever: typed config, batch sources, loop, held-out evaluation.

    cfg = load_retriever_config("configs/retriever/shapes.yaml", ["train.max_steps=100"])
    train_retriever(cfg)  # writes output_dir/{config.yaml, metrics.jsonl, model/}

Sources: `shapes` draws Shapes World batches in memory (captions mix canonical ones and paraphrases;
captions of the same content are positives for each other); `manifest` reads a CSV/JSONL of
(path, caption) rows, images being 1-frame videos.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import OmegaConf

from t2v.eval.retrieval import retrieval_metrics, same_prompt_matches
from t2v.eval.retriever import VideoEncoder, VideoTextRetriever, contrastive_loss

SOURCES = ("shapes", "manifest")
MIXED_PRECISION = ("bf16", "fp32")

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class RetrieverModelConfig:
    # VideoEncoder constructor arguments
    sample_size: int = 64
    patch_size: int = 8
    max_frames: int = 9
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    embed_dim: int = 256
    # text side: "minilm" (offline package), a local path or a hub id
    text_encoder: str = "minilm"
    text_head_hidden: int = 512
    text_trainable_layers: int = 0  # last layers of the text encoder to fine-tune; 0 = frozen
    max_text_length: int = 64
    gradient_checkpointing: bool = False


@dataclass
class RetrieverDataConfig:
    source: str = "shapes"  # shapes | manifest
    manifest: str = ""  # CSV/JSONL with path, caption columns (source=manifest)
    eval_manifest: str = ""  # held-out manifest for evaluation (source=manifest); "" = none
    columns: dict[str, str] = field(default_factory=dict)  # canonical name -> manifest column
    frames: int = 17  # frames decoded per video clip (the encoder subsamples to max_frames)
    fps: float = 8.0
    num_workers: int = 0
    canonical_prob: float = 0.5  # Shapes World: share of canonical captions, the rest paraphrased

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r} is not one of {list(SOURCES)}")
        if self.source == "manifest" and not self.manifest:
            raise ValueError("data.manifest is empty but data.source='manifest'; give the manifest path")
        if not 0.0 <= self.canonical_prob <= 1.0:
            raise ValueError(f"data.canonical_prob={self.canonical_prob} must be in [0, 1]")
        if self.frames < 1 or self.fps <= 0 or self.num_workers < 0:
            raise ValueError(
                f"data.frames={self.frames} must be >= 1, data.fps={self.fps} > 0, "
                f"data.num_workers={self.num_workers} >= 0"
            )


@dataclass
class RetrieverOptimConfig:
    batch_size: int = 256
    max_steps: int = 2000
    max_minutes: float = 0.0  # wall-clock budget (the cosine schedule ends with it); 0 = none
    seed: int = 0
    lr: float = 5e-4
    text_lr: float = 2e-5  # for fine-tuned text-encoder layers
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0  # 0 = no clipping
    mixed_precision: str = "bf16"  # bf16 | fp32
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_size: int = 100  # held-out pairs with distinct captions

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"train.mixed_precision={self.mixed_precision!r} is not one of {list(MIXED_PRECISION)}")
        for name in ("batch_size", "max_steps", "log_every", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.batch_size < 2:
            raise ValueError(f"train.batch_size={self.batch_size} must be >= 2 for in-batch negatives")
        for name in ("max_minutes", "warmup_steps", "eval_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 0")


@dataclass
class RetrieverConfig:
    output_dir: str = "runs/retriever"
    device: str = "cpu"
    threads: int = 0  # torch CPU threads; 0 = torch's default
    model: RetrieverModelConfig = field(default_factory=RetrieverModelConfig)
    data: RetrieverDataConfig = field(default_factory=RetrieverDataConfig)
    train: RetrieverOptimConfig = field(default_factory=RetrieverOptimConfig)


def load_retriever_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RetrieverConfig:
    """Defaults <- YAML <- `key=value` overrides, in OmegaConf struct mode (unknown keys are errors)."""
    from t2v.config import load_structured

    return load_structured(RetrieverConfig, path, overrides)


def build_retriever(cfg: RetrieverModelConfig) -> VideoTextRetriever:
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
    if cfg.gradient_checkpointing:
        encoder.enable_gradient_checkpointing()
    return VideoTextRetriever(
        encoder,
        text_encoder=cfg.text_encoder,
        text_head_hidden=cfg.text_head_hidden,
        text_trainable_layers=cfg.text_trainable_layers,
        max_text_length=cfg.max_text_length,
    )


# ----------------------------------------------------------------------------------------------
# Batch sources: (videos, captions, keys); equal keys mark captions of the same content
# ----------------------------------------------------------------------------------------------


def shapes_batches(batch_size: int, seed: int, canonical_prob: float, device: str) -> Iterator[tuple]:
    """Endless Shapes World training batches; batch i is drawn from `default_rng([seed, i])`."""
    from t2v.data.shapes import canonical_caption, sample_batch

    step = 0
    while True:
        rng = np.random.default_rng([seed, step])
        videos, captions, records = sample_batch(rng, batch_size, "train", canonical_prob, device)
        yield videos, captions, [canonical_caption(r) for r in records]  # (B, T, H, W, 3) uint8
        step += 1


def shapes_eval_set(size: int, seed: int, canonical: bool = True) -> tuple[torch.Tensor, list[str]]:
    """`size` held-out Shapes World pairs whose canonical captions are all distinct.

    Drawn from a seed stream apart from training's; with `canonical=False` each caption is an
    evaluation paraphrase (wordings the training templates do not produce).
    """
    from t2v.data.shapes import canonical_caption, eval_paraphrase, render_batch, sample_record

    rng = np.random.default_rng([seed, 2**31 - 1])
    records, seen = [], set()
    while len(records) < size:
        record = sample_record(rng, split="train")
        key = canonical_caption(record)
        if key not in seen:
            seen.add(key)
            records.append(record)
    captions = [canonical_caption(r) if canonical else eval_paraphrase(r, rng) for r in records]
    return render_batch(records), captions


class _ManifestClips(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict], frames: int, fps: float, size: int, seed: int, random_start: bool):
        self.rows, self.frames, self.fps, self.size = rows, frames, fps, size
        self.seed, self.random_start = seed, random_start

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index: int):
        from t2v.data.video import BadSample, read_clip

        row = self.rows[index]
        rng = np.random.default_rng([self.seed, index])
        try:
            clip = read_clip(
                row["path"], 1 if row["is_image"] else self.frames, self.fps,
                height=self.size, width=self.size, start="random" if self.random_start else None, rng=rng,
            )
        except BadSample:
            return None  # unreadable or too short: dropped from its batch
        # What makes two rows the same content: a Shapes World data set's canonical caption, else the caption.
        return clip, row["caption"], row.get("canonical_caption") or row["caption"]


def _collate_clips(items):
    items = [item for item in items if item is not None]
    return [item[0] for item in items], [item[1] for item in items], [item[2] for item in items]


def manifest_batches(cfg: RetrieverConfig) -> Iterator[tuple]:
    """Endless shuffled manifest batches of uint8 clips (a list: images and videos differ in length)."""
    from t2v.data.manifest import load_manifest

    rows = load_manifest(cfg.data.manifest, columns=cfg.data.columns)
    if len(rows) < cfg.train.batch_size:
        raise ValueError(f"manifest {cfg.data.manifest!r} has {len(rows)} rows, fewer than batch_size {cfg.train.batch_size}")
    data = _ManifestClips(rows, cfg.data.frames, cfg.data.fps, cfg.model.sample_size, cfg.train.seed, True)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True, generator=generator,
        num_workers=cfg.data.num_workers, collate_fn=_collate_clips,
    )
    while True:
        yield from loader  # (clips, captions, keys): equal keys are not contrastive negatives of each other


def manifest_eval_set(cfg: RetrieverConfig) -> tuple[list[np.ndarray], list[str]]:
    """The first `eval_size` readable rows of `data.eval_manifest`."""
    from t2v.data.manifest import load_manifest

    rows = load_manifest(cfg.data.eval_manifest, columns=cfg.data.columns)
    data = _ManifestClips(rows, cfg.data.frames, cfg.data.fps, cfg.model.sample_size, cfg.train.seed, False)
    items = [item for item in (data[i] for i in range(len(rows))) if item is not None][: cfg.train.eval_size]
    return [item[0] for item in items], [item[1] for item in items]


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


def embed_videos(model: VideoTextRetriever, videos) -> torch.Tensor:
    """A uint8 `(B, T, H, W, 3)` batch, or a list of clips of mixed shapes -> normalised `(B, D)`."""
    if not isinstance(videos, list):
        return model.embed_pixels(model.preprocess(videos))
    out = [None] * len(videos)
    by_shape: dict[tuple, list[int]] = {}
    for i, clip in enumerate(videos):
        by_shape.setdefault(tuple(clip.shape), []).append(i)
    for indices in by_shape.values():
        embeddings = model.embed_pixels(model.preprocess(np.stack([videos[i] for i in indices])))
        for i, embedding in zip(indices, embeddings):
            out[i] = embedding
    return torch.stack(out)


def group_ids(keys: list[str], device) -> torch.Tensor:
    """Equal strings -> equal integer ids `(B,)`."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(key, len(ids)) for key in keys], device=device)


def in_batch_accuracy(text_emb: torch.Tensor, video_emb: torch.Tensor, groups: torch.Tensor) -> float:
    """Share of texts whose most similar video in the batch has the same content (text-to-video R@1)."""
    best = (text_emb @ video_emb.T).argmax(1)
    return (groups[best] == groups).float().mean().item()


def lr_factor(step: int, warmup_steps: int, progress: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to 0 as `progress` (0..1) runs out."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: VideoTextRetriever, cfg: RetrieverOptimConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms, biases, embeddings and the logit scale do not."""
    decay, no_decay, text = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("text_encoder."):
            text.append(param)
        elif param.ndim >= 2 and "pos_" not in name and "cls_token" not in name:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
    ]
    if text:
        groups.append({"params": text, "weight_decay": cfg.weight_decay, "lr": cfg.text_lr})
    for group in groups:
        group["base_lr"] = group["lr"]
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)


@torch.no_grad()
def evaluate(model: VideoTextRetriever, videos, captions: list[str]) -> dict[str, float]:
    """Retrieval metrics of `captions` against `videos` (pair i matches i, and every video of an equal caption)."""
    was_training = model.training
    model.eval()
    clips = [np.asarray(v.cpu()) if isinstance(v, torch.Tensor) else v for v in videos]
    sim = model.similarity(captions, clips)
    model.train(was_training)
    return retrieval_metrics(sim, same_prompt_matches(captions))


def train_retriever(cfg: RetrieverConfig) -> dict[str, float]:
    """Train, evaluate, and save to `output_dir/model`; returns the final evaluation metrics."""
    torch.manual_seed(cfg.train.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    os.makedirs(cfg.output_dir, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), os.path.join(cfg.output_dir, "config.yaml"))  # resolved config
    log_path = os.path.join(cfg.output_dir, "metrics.jsonl")

    # 1. model, optimiser, autocast dtype (chosen once)
    model = build_retriever(cfg.model).to(device).train()
    optimizer = make_optimizer(model, cfg.train)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16")

    # 2. data
    if cfg.data.source == "shapes":
        batches = shapes_batches(cfg.train.batch_size, cfg.train.seed, cfg.data.canonical_prob, str(device))
        eval_sets = {
            "canonical": shapes_eval_set(cfg.train.eval_size, cfg.train.seed, canonical=True),
            "paraphrase": shapes_eval_set(cfg.train.eval_size, cfg.train.seed, canonical=False),
        }
    else:
        batches = manifest_batches(cfg)
        eval_sets = {"eval": manifest_eval_set(cfg)} if cfg.data.eval_manifest else {}

    def run_eval(step: int) -> dict[str, float]:
        metrics = {}
        for name, (videos, captions) in eval_sets.items():
            for key, value in evaluate(model, videos, captions).items():
                metrics[f"{name}/{key}"] = value
        if metrics:
            record = {"step": step, **metrics}
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in record.items()}), flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return metrics

    # 3. loop
    start = last_log = time.time()
    metrics: dict[str, float] = {}
    step = 0
    for step in range(cfg.train.max_steps):
        # progress: the share of the step budget or of the time budget spent, whichever is larger
        progress = step / cfg.train.max_steps
        if cfg.train.max_minutes:
            progress = max(progress, (time.time() - start) / (60 * cfg.train.max_minutes))
        factor = lr_factor(step, cfg.train.warmup_steps, progress)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

        videos, captions, keys = next(batches)
        groups = group_ids(keys, device)
        features = model.sentence_features(captions)  # (B, text_dim), cached per string when frozen
        with torch.autocast(**autocast):
            text_emb = model.embed_text_features(features)
            video_emb = embed_videos(model, videos)
            loss = contrastive_loss(text_emb, video_emb, model.logit_scale, groups)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.train.grad_clip)
        optimizer.step()
        model.clamp_logit_scale()

        if (step + 1) % cfg.train.log_every == 0 or step == 0:
            now = time.time()
            steps_done = cfg.train.log_every if step > 0 else 1
            record = {
                "step": step + 1,
                "loss": loss.item(),
                "batch_t2v_acc": in_batch_accuracy(text_emb.detach(), video_emb.detach(), groups),
                "logit_scale": model.logit_scale.exp().item(),
                "lr": cfg.train.lr * factor,
                "steps_per_s": steps_done / max(now - last_log, 1e-9),
                "elapsed_s": now - start,
            }
            last_log = now
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.max_steps:
            run_eval(step + 1)
        if cfg.train.max_minutes and time.time() - start > 60 * cfg.train.max_minutes:
            print(f"time budget of {cfg.train.max_minutes} min reached after {step + 1} steps", flush=True)
            break

    # 4. final evaluation and save
    metrics = run_eval(step + 1)
    model.eval().save_pretrained(os.path.join(cfg.output_dir, "model"))
    return metrics

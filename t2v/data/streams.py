"""Endless, resumable batch streams for training: manifest clips through buckets, and the one Shapes World stream."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from t2v.config import Config


class LoaderStream:
    """Batches from a DataLoader over a `BucketBatchSampler`, epoch after epoch, resumable mid-epoch.

    The position is the sampler's (epoch, global batches done), counted from the batches taken here,
    so DataLoader workers prefetching ahead do not move it.
    """

    def __init__(self, dataset, sampler, collate_fn=None, num_workers: int = 0, seed: int = 0):
        from torch.utils.data import DataLoader

        self.dataset, self.sampler = dataset, sampler
        # An explicit generator keeps the loader from drawing on the global RNG.
        self.loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                                 generator=torch.Generator().manual_seed(seed))
        self._iterator = None
        self._taken = 0

    def __next__(self):
        for _ in range(2):  # at most one epoch boundary per batch
            if self._iterator is None:
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(self.sampler.epoch)
                self._iterator, self._taken = iter(self.loader), 0
            try:
                batch = next(self._iterator)
                self._taken += 1
                return batch
            except StopIteration:
                if hasattr(self.dataset, "report_skipped"):
                    self.dataset.report_skipped()
                self.sampler.set_epoch(self.sampler.epoch + 1)
                self._iterator = None
        raise ValueError(
            f"an epoch of {len(self.dataset)} samples yields no full batch; lower data.batch_size or add data"
        )

    def state_dict(self) -> dict:
        return self.sampler.state_dict(consumed=self._taken)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._iterator = None


def manifest_dataset(cfg: Config, rows: list[dict], caption_dropout: float = 0.0, start: str | None = "random"):
    """A `VideoTextDataset` over manifest rows with the configured buckets (`data.buckets`, or the one of
    data.frames/height/width/batch_size)."""
    from t2v.data.buckets import parse_buckets
    from t2v.data.dataset import VideoTextDataset

    data = cfg.data
    buckets = parse_buckets(
        [vars(b) for b in data.buckets]
        or [{"frames": data.frames, "height": data.height, "width": data.width, "batch_size": data.batch_size}]
    )
    return VideoTextDataset(rows, buckets, fps=data.fps, caption_dropout=caption_dropout, seed=cfg.train.seed,
                            start=start)


def manifest_stream(cfg: Config, rows: list[dict], caption_dropout: float, rank: int, world_size: int):
    """(dataset, LoaderStream) over manifest rows with the configured buckets."""
    from t2v.data.buckets import BucketBatchSampler
    from t2v.data.dataset import collate_skip_none

    dataset = manifest_dataset(cfg, rows, caption_dropout)
    sampler = BucketBatchSampler(dataset.bucket_ids, dataset.buckets, seed=cfg.train.seed, rank=rank,
                                 world_size=world_size)
    return dataset, LoaderStream(dataset, sampler, collate_skip_none, cfg.data.num_workers, cfg.train.seed)


def next_readable(stream: LoaderStream, dataset, manifest: str = "") -> dict:
    """The next manifest batch with at least one readable video; unreadable files are counted, not fatal.

    As many unreadable samples in a row as the data set holds, and none readable, is an error naming the
    `manifest` and the counts by cause (a manifest whose every file is unreadable would otherwise loop for ever).
    """
    unreadable: Counter = Counter()
    while True:
        batch = next(stream)
        dataset.count_skipped(batch["skipped"])
        if batch["video"] is not None:
            return batch
        unreadable.update(batch["skipped"])
        if sum(unreadable.values()) >= len(dataset):
            raise ValueError(f"data.manifest={manifest!r}: {sum(unreadable.values())} samples in a row were unreadable and none "
                             f"readable (by cause: {dict(unreadable)}); check the paths and files it lists")


# Shapes World stream numbers: training streams are the data-parallel ranks, these lie far above them.
HELD_OUT_STREAM = 2**20  # held-out clips for validation
STATS_STREAM = 2**20 + 1  # clips measured once (a VAE's latent statistics)


class ShapesBatches:
    """In-memory Shapes World batches, resumable:
    {"video": (B, 3, T, H, W) in [-1, 1], "caption": [str], "canonical_caption": [str]}.

    The canonical caption names the content (paraphrases of one clip share it). One numpy generator per stream
    (use the rank for training) draws everything: records, wording, caption dropout; its state is the stream
    position.
    """

    def __init__(self, batch_size: int, seed: int, stream: int, canonical_prob: float, caption_dropout: float,
                 device: torch.device, split: str = "train", wordings: str = "base", two_object_prob: float = 0.5):
        self.batch_size, self.canonical_prob, self.caption_dropout = batch_size, canonical_prob, caption_dropout
        self.device, self.split, self.wordings, self.two_object_prob = device, split, wordings, two_object_prob
        self.rng = np.random.default_rng([seed, stream])

    def __next__(self) -> dict:
        from einops import rearrange

        from t2v.data.shapes import canonical_caption, sample_batch

        videos, captions, records = sample_batch(self.rng, self.batch_size, self.split, self.canonical_prob,
                                                 self.device, wordings=self.wordings,
                                                 two_object_prob=self.two_object_prob)
        dropped = self.rng.random(len(captions)) < self.caption_dropout
        captions = ["" if drop else caption for caption, drop in zip(captions, dropped)]
        video = rearrange(videos, "b t h w c -> b c t h w").float() / 127.5 - 1.0  # (B, 3, T, H, W)
        return {"video": video, "caption": captions, "canonical_caption": [canonical_caption(r) for r in records]}

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def shapes_stream(cfg: Config, stream: int, device, caption_dropout: float = 0.0) -> ShapesBatches:
    """The Shapes World stream `stream` of `cfg.data` (batch size, caption mix); refuses clip sizes it cannot render."""
    from t2v.data.shapes import NUM_FRAMES, SIZE

    data = cfg.data
    if (data.frames, data.height, data.width) != (NUM_FRAMES, SIZE, SIZE):
        raise ValueError(
            f"data.source='shapes' renders {NUM_FRAMES}x{SIZE}x{SIZE} clips, but data.frames/height/width = "
            f"{data.frames}/{data.height}/{data.width}; set them to {NUM_FRAMES}/{SIZE}/{SIZE}"
        )
    return ShapesBatches(data.batch_size, cfg.train.seed, stream, data.shapes.canonical_prob, caption_dropout, device,
                         wordings=data.shapes.wordings, two_object_prob=data.shapes.two_object_prob)

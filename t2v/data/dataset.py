"""Video-text dataset over manifest rows and shape buckets.

A file that is missing, corrupt or too short never stops training: `__getitem__` returns a
`Skipped` marker instead of a sample, `collate_skip_none` drops it and lists its reason under
`batch["skipped"]`, and the training loop hands that list to `count_skipped` (in the main process,
so counts from DataLoader workers are not lost) and calls `report_skipped()` at the end of an epoch.
A batch whose samples were all skipped has `video=None`; the loop skips it.

Randomness (caption dropout, random clip start) comes from generators seeded by
(seed, epoch, index), so a resumed run draws exactly what the uninterrupted one drew. Call
`set_epoch` before creating each epoch's DataLoader iterator (the default, non-persistent workers
copy the dataset at that moment).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset

from t2v.data.buckets import Bucket, assign_buckets
from t2v.data.video import BadSample, read_clip

logger = logging.getLogger(__name__)

# Streams of the per-sample generator, so caption dropout and clip start draw independently.
_CAPTION_STREAM, _START_STREAM = 0, 1


@dataclass
class Skipped:
    """Stands in for a sample that could not be read."""

    index: int
    reason: str  # "missing", "corrupt" or "too_short"
    message: str


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (C, T, H, W) in [-1, 1]."""
    video = torch.from_numpy(frames).float() / 127.5 - 1.0
    return rearrange(video, "t h w c -> c t h w")


class VideoTextDataset(Dataset):
    """Manifest rows as {"video": (C, T, H, W) in [-1, 1], "caption": str, "index": int}.

    rows: output of `load_manifest`. buckets: clip shapes; each row gets one from `assign_buckets`
    (rows it skips are counted in `unassigned` and never sampled). fps: sampling rate (None: every
    frame). start: where clips begin, "random" or None (the beginning).
    """

    def __init__(
        self,
        rows: Sequence[dict],
        buckets: Sequence[Bucket],
        fps: float | None = None,
        caption_dropout: float = 0.0,
        seed: int = 0,
        start: str | None = "random",
    ):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout {caption_dropout} must be in [0, 1]")
        if start not in (None, "random"):
            raise ValueError(f"start {start!r} must be 'random' or None")
        self.rows = list(rows)
        self.buckets = list(buckets)
        self.fps, self.caption_dropout, self.seed, self.start = fps, caption_dropout, seed, start
        self.bucket_ids, self.unassigned = assign_buckets(self.rows, self.buckets, fps=fps)
        if self.unassigned:
            logger.warning("%d manifest rows fit no bucket and are left out: %s", sum(self.unassigned.values()),
                           dict(self.unassigned))
        self.epoch = 0
        self.skipped: Counter = Counter()

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index, stream])

    def __getitem__(self, item: int | tuple[int, int]) -> dict | Skipped:
        # 1. resolve the bucket
        if isinstance(item, tuple):
            index, bucket_id = item
        else:
            index, bucket_id = item, self.bucket_ids[item]
        if bucket_id is None:
            raise ValueError(f"row {index} has no bucket ({dict(self.unassigned)} rows fit none); "
                             "sample with BucketBatchSampler over dataset.bucket_ids")
        bucket, row = self.buckets[bucket_id], self.rows[index]

        # 2. decode
        try:
            frames = read_clip(row["path"], bucket.frames, self.fps, height=bucket.height, width=bucket.width,
                               start=self.start, rng=self._rng(index, _START_STREAM))
        except BadSample as e:
            return Skipped(index=index, reason=e.reason, message=str(e))

        # 3. caption dropout
        caption = row["caption"]
        if self.caption_dropout > 0 and self._rng(index, _CAPTION_STREAM).random() < self.caption_dropout:
            caption = ""
        return {"video": frames_to_tensor(frames), "caption": caption, "index": index}

    def count_skipped(self, reasons: Sequence[str]) -> None:
        """Add a batch's `skipped` reasons to this epoch's counts."""
        self.skipped.update(reasons)

    def report_skipped(self, reset: bool = True) -> dict[str, int]:
        """Log and return the counts of skipped samples by reason; by default start counting afresh."""
        counts = dict(self.skipped)
        if counts:
            logger.warning("epoch %d: skipped %d unreadable samples: %s", self.epoch, sum(counts.values()), counts)
        if reset:
            self.skipped.clear()
        return counts


def collate_skip_none(batch: Sequence[dict | Skipped | None]) -> dict:
    """Stack the readable samples; list the reasons of the rest under "skipped".

    Returns {"video": (B, C, T, H, W) or None when B == 0, "caption": list[str], "index": (B,) long,
    "skipped": list[str]}. A plain None counts as reason "unknown".
    """
    samples = [s for s in batch if isinstance(s, dict)]
    skipped = [s.reason if isinstance(s, Skipped) else "unknown" for s in batch if not isinstance(s, dict)]
    return {
        "video": torch.stack([s["video"] for s in samples]) if samples else None,  # (B, C, T, H, W)
        "caption": [s["caption"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "skipped": skipped,
    }

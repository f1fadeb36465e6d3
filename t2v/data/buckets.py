"""Shape buckets and a resumable, sharded batch sampler over them.

A bucket is a clip shape (frames, height, width) with its own batch size; every batch holds samples
of one bucket, so clips of different shapes never meet in a batch.

Sampler positions are counted in *global* batches: epoch e is one fixed, seeded list of batches
(shuffled within buckets, then in batch order), and round r hands global batch r * world_size + rank
to each rank. `state_dict()["batches_done"]` is the number of global batches consumed, so a run saved
with 2 ranks and resumed with 1 (or the other way) continues from the same place in that list.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int
    batch_size: int

    def __post_init__(self):
        for name in ("frames", "height", "width", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"bucket {name} {value!r} must be a positive integer")

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def volume(self) -> int:
        return self.frames * self.height * self.width


def parse_buckets(config: Sequence[dict]) -> list[Bucket]:
    """Buckets from a list of {"frames", "height", "width", "batch_size"} dicts; keys must be unique."""
    if not config:
        raise ValueError("bucket config is empty; give at least one {frames, height, width, batch_size}")
    buckets = []
    for entry in config:
        expected = {"frames", "height", "width", "batch_size"}
        if set(entry) != expected:
            raise ValueError(f"bucket entry {dict(entry)} must have exactly the keys {sorted(expected)}")
        buckets.append(Bucket(**{name: entry[name] for name in expected}))
    keys = [bucket.key for bucket in buckets]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"bucket shapes {duplicates} appear more than once")
    return buckets


def _frames_at(row: dict, fps: float | None) -> int | None:
    """Frames the row offers when sampled at `fps` (its own frame count when fps or its fps is unknown)."""
    frames = row.get("frames")
    if frames is None or fps is None or not row.get("fps"):
        return frames
    return int((frames - 1) * fps / row["fps"]) + 1


def assign_buckets(
    rows: Sequence[dict], buckets: Sequence[Bucket], fps: float | None = None
) -> tuple[list[int | None], Counter]:
    """Bucket id per row (None when skipped) and a Counter of skip reasons.

    Images go to the 1-frame bucket (the largest if several), else are skipped as "image_no_bucket".
    Videos go to a multi-frame bucket that their optional frames/height/width columns allow (frames
    counted at the sampling `fps` when the row gives its fps): with height and width, the one nearest
    their aspect ratio (the largest among equally near), so landscape and portrait clips are not cropped
    to squares; otherwise the largest. Rows without those columns go to the first multi-frame bucket. Videos that fit no bucket are skipped as "video_too_small", and
    all videos as "video_no_bucket" when only 1-frame buckets exist.
    """
    image_ids = [i for i, bucket in enumerate(buckets) if bucket.frames == 1]
    video_ids = [i for i, bucket in enumerate(buckets) if bucket.frames > 1]
    largest_image = max(image_ids, key=lambda i: buckets[i].volume) if image_ids else None
    # Largest first; ties keep config order.
    by_size = sorted(video_ids, key=lambda i: -buckets[i].volume)

    bucket_ids: list[int | None] = []
    skipped: Counter = Counter()
    for row in rows:
        if row.get("is_image"):
            choice = largest_image
            if choice is None:
                skipped["image_no_bucket"] += 1
        elif not video_ids:
            choice = None
            skipped["video_no_bucket"] += 1
        elif row.get("frames") is None and row.get("height") is None and row.get("width") is None:
            choice = video_ids[0]
        else:
            frames, height, width = _frames_at(row, fps), row.get("height"), row.get("width")
            fitting = [
                i
                for i in by_size
                if (frames is None or buckets[i].frames <= frames)
                and (height is None or buckets[i].height <= height)
                and (width is None or buckets[i].width <= width)
            ]
            if fitting and height and width:  # nearest aspect ratio (log scale), then the largest
                distance = {i: abs(math.log(buckets[i].width / buckets[i].height) - math.log(width / height))
                            for i in fitting}
                nearest = min(distance.values())
                fitting = [i for i in fitting if distance[i] <= nearest + 1e-9]
            choice = fitting[0] if fitting else None
            if choice is None:
                skipped["video_too_small"] += 1
        bucket_ids.append(choice)
    return bucket_ids, skipped


class BucketBatchSampler(Sampler):
    """Yields lists of dataset indices, one bucket per batch; deterministic, sharded and resumable.

    Each epoch's global batch list depends only on (seed, epoch); incomplete batches are dropped. Every
    rank yields (len(global batches) - batches_done) // world_size batches, disjoint from other ranks.

    Position: `batches_done` counts global batches. The sampler advances it by world_size per batch it
    yields, which is exact when the DataLoader has no workers; with workers the loader prefetches ahead,
    so pass `state_dict(consumed=n)` with n the batches the training loop took from the loader since
    this epoch's iteration began. `set_epoch(e)` with a new e restarts at the beginning of epoch e; with
    the current epoch (as a loop calls it after `load_state_dict`) it keeps the loaded position.
    """

    def __init__(
        self,
        bucket_ids: Sequence[int | None],
        buckets: Sequence[Bucket],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if world_size < 1:
            raise ValueError(f"world_size {world_size} must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        bad = sorted({b for b in bucket_ids if b is not None and not 0 <= b < len(buckets)})
        if bad:
            raise ValueError(f"bucket ids {bad} are not in [0, {len(buckets)})")
        self.buckets = list(buckets)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.members = [[i for i, b in enumerate(bucket_ids) if b == k] for k in range(len(self.buckets))]
        self.epoch = 0
        self._start = 0  # global batches already consumed when the current iteration began
        self._yielded = 0  # batches this rank has yielded since then

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch` in order, before sharding."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for members, bucket in zip(self.members, self.buckets):
            order = rng.permutation(len(members))
            complete = len(members) // bucket.batch_size * bucket.batch_size
            for first in range(0, complete, bucket.batch_size):
                batches.append([members[j] for j in order[first : first + bucket.batch_size]])
        return [batches[j] for j in rng.permutation(len(batches))]

    def num_global_batches(self) -> int:
        return sum(len(m) // b.batch_size for m, b in zip(self.members, self.buckets))

    def __len__(self) -> int:
        return max(0, self.num_global_batches() - self._start) // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)
        start = self._start
        self._yielded = 0
        for position in range(start + self.rank, start + len(self) * self.world_size, self.world_size):
            self._yielded += 1
            yield batches[position]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._start, self._yielded = epoch, 0, 0

    def state_dict(self, consumed: int | None = None) -> dict:
        local = self._yielded if consumed is None else consumed
        return {"epoch": self.epoch, "batches_done": self._start + local * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        epoch, batches_done = state["epoch"], state["batches_done"]
        if batches_done < 0:
            raise ValueError(f"batches_done {batches_done} must be non-negative")
        self.epoch, self._start, self._yielded = epoch, batches_done, 0

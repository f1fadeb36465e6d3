"""Shapes World as an evaluation, in memory (no video files, no codec): the read-back of a pipeline's
generations (DiT validation, `train.validation_shapes`) and held-out retrieval pairs (retriever validation).
"""

from __future__ import annotations

import numpy as np
import torch

from t2v.data.shapes import canonical_caption, eval_paraphrase, make_prompts, render_batch, sample_record
from t2v.eval.shapes_readback import attribute_accuracy


@torch.no_grad()
def generate_frames(pipe, prompts: list[str], seeds: list[int], batch_size: int = 32, pooled: str = "prompt",
                    image=None, video=None, **call) -> list[np.ndarray]:
    """uint8 (F, H, W, 3) clips of `prompts`, prompt i with a CPU generator seeded `seeds[i]`.

    `image` (N, H, W, 3) or `video` (N, F, H, W, 3), one per prompt, go with their prompts to a
    frame-conditioned pipeline (image-to-video, extension).

    pooled="empty" is a diagnostic: the prompt's pooled vector (adaLN) is replaced by the empty prompt's, so
    the prompt reaches the DiT only through the per-token states (cross-attention).
    """
    if pooled not in ("prompt", "empty"):
        raise ValueError(f"pooled {pooled!r} must be 'prompt' or 'empty'")
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts and {len(seeds)} seeds must be the same number")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be at least 1")
    for name, given in (("image", image), ("video", video)):
        if given is not None and len(given) != len(prompts):
            raise ValueError(f"{len(given)} given {name}s and {len(prompts)} prompts must be the same number")
    videos = []
    for b in range(0, len(prompts), batch_size):
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[b : b + batch_size]]
        text = {"prompt": prompts[b : b + batch_size]}
        if pooled == "empty":
            embeds = pipe.encode_prompt(text["prompt"], pipe.device)
            empty = pipe.encode_prompt([""] * len(text["prompt"]), pipe.device)
            embeds.pooled = empty.pooled
            text = {"prompt_embeds": embeds, "negative_prompt_embeds": empty}
        for name, given in (("image", image), ("video", video)):
            if given is not None:
                text[name] = given[b : b + batch_size]
        frames = pipe(**text, generator=generators, output_type="np", **call).frames  # (B, F, H, W, 3) in [0, 1]
        videos.extend((np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8))
    return videos


def readback_by_category(videos: list[np.ndarray], rows: list[dict], shape_method: str = "template") -> dict:
    """{category: {attribute: rate}} over `rows` ({"category", "record"}, as `make_prompts` gives) and their videos."""
    if len(videos) != len(rows):
        raise ValueError(f"{len(videos)} videos and {len(rows)} rows must be the same number")
    scores = {}
    for category in dict.fromkeys(row["category"] for row in rows):
        picked = [i for i, row in enumerate(rows) if row["category"] == category]
        scores[category] = attribute_accuracy([videos[i] for i in picked], [rows[i]["record"] for i in picked],
                                              shape_method)
    return scores


def readback_metrics(pipe, per_category: int) -> dict[str, float]:
    """{"{category}/{attribute}": rate} of `pipe`'s generations of the evaluation prompts `make_prompts(0,
    per_category)`, prompt i with seed i."""
    rows = make_prompts(0, per_category)
    videos = generate_frames(pipe, [row["prompt"] for row in rows], list(range(len(rows))))
    return {f"{category}/{attribute}": rate
            for category, rates in readback_by_category(videos, rows).items() for attribute, rate in rates.items()}


def retrieval_pairs(size: int, seed: int, canonical: bool = True) -> tuple[torch.Tensor, list[str]]:
    """`size` held-out pairs (uint8 videos (N, T, H, W, 3), captions) whose canonical captions are all distinct.

    Drawn from a seed stream apart from training's; with `canonical=False` each caption is an evaluation
    paraphrase (wordings the training templates do not produce).
    """
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


__all__ = ["generate_frames", "readback_by_category", "readback_metrics", "retrieval_pairs"]

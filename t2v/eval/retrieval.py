"""Text-video retrieval metrics: R@K, median and mean rank, both directions, optional dual softmax.

Conventions (CLIP4Clip, Frozen in Time): ``sim`` is (num_texts, num_videos); ranks are 1-based;
R@K is the percentage (0-100) of queries whose target ranks at most K.

Several captions per video: ``text_to_video[i]`` names the video of caption ``i``. Text-to-video ranks
each caption's single target video. Video-to-text ranks a video by the best rank among its captions:
``1 + number of non-matching captions scoring above its best caption`` (ties, below, decide how equal
scores count). Its other captions never push it down. Several videos per caption (a prompt set with
repeated prompts): a bool ``text_to_video`` matrix marks every matching pair, and every query ranks by
its best-scoring target in the same way.

Ties: ``"pessimistic"`` (default) puts the target below every non-target with an equal score, so a
constant similarity matrix scores worst (R@1 = 0 unless there is a single candidate); ``"optimistic"``
puts it above them; ``"average"`` takes the mean of the two (fractional ranks).
"""

from __future__ import annotations

import numpy as np

TIES = ("pessimistic", "optimistic", "average")
RECALL_KS = (1, 5, 10)


def to_numpy(x, name: str = "input") -> np.ndarray:
    """A float64 numpy copy of a numpy array, torch tensor or nested list."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):  # no exact numpy type; float32 holds them exactly
            x = x.float()
        x = x.numpy()  # float64 stays float64: ties stay exact
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numeric array-like, got {type(x).__name__}") from err


def check_similarity(sim, name: str = "sim") -> np.ndarray:
    """``sim`` as a finite, non-empty 2-D float64 array, or ``ValueError``."""
    sim = to_numpy(sim, name)
    if sim.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_texts, num_videos), got shape {sim.shape}")
    if sim.size == 0:
        raise ValueError(f"{name} must be non-empty, got shape {sim.shape}")
    if not np.isfinite(sim).all():
        bad = np.argwhere(~np.isfinite(sim))[0].tolist()
        raise ValueError(f"{name} must be finite, found {sim[tuple(bad)]} at index {bad}")
    return sim


def check_text_to_video(text_to_video, num_texts: int, num_videos: int) -> np.ndarray:
    """The (num_texts, num_videos) bool matrix of matching pairs, or ``ValueError``.

    ``text_to_video`` is None (identity, square ``sim`` only), a (num_texts,) int array naming each text's
    video, or a (num_texts, num_videos) bool matrix marking every matching pair.
    """
    if text_to_video is None:
        if num_texts != num_videos:
            raise ValueError(
                f"text_to_video is required when sim is not square, got {num_texts} texts x {num_videos} videos"
            )
        return np.eye(num_texts, dtype=bool)
    if hasattr(text_to_video, "detach"):
        text_to_video = text_to_video.detach().cpu().numpy()
    t2v = np.asarray(text_to_video)
    if t2v.ndim == 2:
        if t2v.shape != (num_texts, num_videos) or t2v.dtype != np.bool_:
            raise ValueError(
                f"a text_to_video matrix must be bool of shape ({num_texts}, {num_videos}), got {t2v.dtype} {t2v.shape}"
            )
        if not t2v.any(axis=1).all():
            raise ValueError(f"every text needs a matching video; text {int(np.argmin(t2v.any(axis=1)))} has none")
        if not t2v.any(axis=0).all():
            raise ValueError(f"every video needs at least one caption; video {int(np.argmin(t2v.any(axis=0)))} has none")
        return t2v
    if t2v.shape != (num_texts,):
        raise ValueError(f"text_to_video must have shape ({num_texts},), one index per text, got {t2v.shape}")
    if not np.issubdtype(t2v.dtype, np.integer):
        raise ValueError(f"text_to_video must hold integer video indices, got dtype {t2v.dtype}")
    out_of_range = (t2v < 0) | (t2v >= num_videos)
    if out_of_range.any():
        i = int(np.argmax(out_of_range))
        raise ValueError(f"text_to_video[{i}] = {t2v[i]} is out of range for {num_videos} videos")
    missing = np.setdiff1d(np.arange(num_videos), t2v)
    if missing.size:
        raise ValueError(f"every video needs at least one caption; video {int(missing[0])} has none")
    return t2v.astype(np.int64)[:, None] == np.arange(num_videos)[None, :]


def same_prompt_matches(prompts) -> np.ndarray:
    """(N, N) bool ``text_to_video`` matrix for prompt i made video i: a prompt matches every video of an
    equal prompt, so a repeated prompt neither loses its text-to-video rank to its twin's video nor
    pushes a video down the video-to-text ranking with its twin's equal score."""
    prompts = np.asarray(list(prompts), dtype=object)
    return prompts[:, None] == prompts[None, :]


def _ranks(scores: np.ndarray, targets: np.ndarray, ties: str) -> np.ndarray:
    """Rank of each query's best target among its non-targets.

    ``scores`` (Q, C): each query's scores over C candidates; ``targets`` (Q, C) bool marks the targets.
    """
    best = np.where(targets, scores, -np.inf).max(axis=1, keepdims=True)  # (Q, 1)
    others = np.where(targets, np.nan, scores)  # (Q, C); NaN never compares true
    above = (others > best).sum(axis=1)
    equal = (others == best).sum(axis=1)
    if ties == "pessimistic":
        return (1 + above + equal).astype(np.float64)
    if ties == "optimistic":
        return (1 + above).astype(np.float64)
    return 1 + above + equal / 2.0


def retrieval_ranks(sim, text_to_video=None, ties: str = "pessimistic") -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks ``(t2v_ranks (num_texts,), v2t_ranks (num_videos,))``; see the module docstring."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    sim = check_similarity(sim)
    num_texts, num_videos = sim.shape
    match = check_text_to_video(text_to_video, num_texts, num_videos)  # (num_texts, num_videos)
    t2v_ranks = _ranks(sim, match, ties)
    v2t_ranks = _ranks(sim.T, match.T, ties)
    return t2v_ranks, v2t_ranks


def summarize_ranks(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    """R@1/5/10 in percent, median rank and mean rank of 1-based ``ranks`` under ``prefix``."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {f"{prefix}/R{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_KS}
    out[f"{prefix}/MedR"] = float(np.median(ranks))
    out[f"{prefix}/MnR"] = float(np.mean(ranks))
    return out


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def dual_softmax_scores(sim, temperature: float = 0.01, axis: int = 0) -> np.ndarray:
    """CAMoE dual-softmax re-scoring: ``sim * softmax(sim / temperature, axis)``.

    For text-to-video ranking (rows) the prior is a softmax over texts (``axis=0``); for video-to-text
    (columns) over videos (``axis=1``). It uses the whole test set at once (transductive).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 (softmax over texts) or 1 (over videos), got {axis}")
    sim = check_similarity(sim)
    return sim * _softmax(sim / temperature, axis=axis)


def retrieval_metrics(
    sim,
    text_to_video=None,
    ties: str = "pessimistic",
    dual_softmax: bool = False,
    temperature: float = 0.01,
) -> dict[str, float]:
    """Retrieval metrics of a (num_texts, num_videos) similarity matrix.

    Args:
        sim: similarities, numpy or torch, (num_texts, num_videos).
        text_to_video: (num_texts,) int index of each text's video, or a (num_texts, num_videos) bool
            matrix of matching pairs (``same_prompt_matches``); default identity (square ``sim``).
        ties: ``"pessimistic"``, ``"optimistic"`` or ``"average"``.
        dual_softmax: also report CAMoE dual-softmax re-scored metrics under ``dsl/...`` keys.
        temperature: dual-softmax temperature (0.01 is CAMoE's logit scale of 100).

    Returns:
        ``{"t2v/R1", "t2v/R5", "t2v/R10", "t2v/MedR", "t2v/MnR", "v2t/..."}`` (plus ``"dsl/t2v/..."``,
        ``"dsl/v2t/..."`` with ``dual_softmax``), R@K in percent, ranks 1-based.
    """
    sim = check_similarity(sim)
    t2v_ranks, v2t_ranks = retrieval_ranks(sim, text_to_video, ties)
    out = {**summarize_ranks(t2v_ranks, "t2v"), **summarize_ranks(v2t_ranks, "v2t")}
    if dual_softmax:
        # Each direction gets its own prior: rows are re-scored over texts, columns over videos.
        t2v_dsl, _ = retrieval_ranks(dual_softmax_scores(sim, temperature, axis=0), text_to_video, ties)
        _, v2t_dsl = retrieval_ranks(dual_softmax_scores(sim, temperature, axis=1), text_to_video, ties)
        out.update(summarize_ranks(t2v_dsl, "dsl/t2v"))
        out.update(summarize_ranks(v2t_dsl, "dsl/v2t"))
    return out


"""Prompt-video agreement from embeddings: CLIPSIM and R-precision."""

from __future__ import annotations

import numpy as np

from t2v.eval.retrieval import check_similarity, to_numpy


def _normalize(x: np.ndarray, name: str) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    if (norm == 0).any():
        raise ValueError(f"{name} contains an all-zero embedding, which has no direction")
    return x / norm


def clipsim(text_emb, video_emb, scale: float = 1.0, per_pair: bool = False):
    """Mean cosine similarity of matched (prompt, video) pairs, CLIPSIM-style.

    Args:
        text_emb: (N, D) prompt embeddings.
        video_emb: (N, D) video embeddings, or (N, T, D) per-frame embeddings; per-frame similarities
            are averaged over frames as CLIPSIM (GODIVA) does.
        scale: multiplier; pass 100 for the 0-100 numbers CLIPSIM papers report.
        per_pair: return the (N,) per-pair scores instead of their mean.

    Inputs need not be normalised; numpy or torch.
    """
    text = to_numpy(text_emb, "text_emb")
    video = to_numpy(video_emb, "video_emb")
    if text.ndim != 2:
        raise ValueError(f"text_emb must be 2-D (N, D), got shape {text.shape}")
    if video.ndim not in (2, 3):
        raise ValueError(f"video_emb must be (N, D) or (N, T, D), got shape {video.shape}")
    if video.shape[0] != text.shape[0] or video.shape[-1] != text.shape[-1]:
        raise ValueError(
            f"text_emb {text.shape} and video_emb {video.shape} must agree in N (pairs) and D (width)"
        )
    if not (np.isfinite(text).all() and np.isfinite(video).all()):
        raise ValueError("text_emb and video_emb must be finite")
    text = _normalize(text, "text_emb")
    video = _normalize(video, "video_emb")
    if video.ndim == 2:
        scores = np.einsum("nd,nd->n", text, video)
    else:
        scores = np.einsum("nd,ntd->nt", text, video).mean(axis=1)
    scores = scale * scores
    return scores if per_pair else float(scores.mean())


def r_precision(
    sim,
    num_distractors: int = 99,
    num_trials: int = 100,
    seed: int = 0,
    rng: np.random.Generator | None = None,
) -> float:
    """R-precision: how often a video scores its own prompt above random distractor prompts.

    ``sim`` is square (num_prompts, num_videos), prompt ``i`` made video ``i``. For each video and each
    of ``num_trials`` trials, ``num_distractors`` other prompts are drawn without replacement; a trial
    succeeds when the own prompt scores strictly above all of them (a tie fails). Returns the fraction
    of successes in [0, 1], averaged over trials and videos. Deterministic for a given ``seed``
    (or ``rng``, which takes precedence). 99 distractors (R-precision at 100) follows AttnGAN.
    """
    sim = check_similarity(sim)
    num_prompts, num_videos = sim.shape
    if num_prompts != num_videos:
        raise ValueError(f"sim must be square (prompt i made video i), got shape {sim.shape}")
    if not 1 <= num_distractors <= num_prompts - 1:
        raise ValueError(
            f"num_distractors={num_distractors} must be in [1, {num_prompts - 1}] for {num_prompts} prompts"
        )
    if num_trials < 1:
        raise ValueError(f"num_trials must be >= 1, got {num_trials}")
    rng = np.random.default_rng(seed) if rng is None else rng

    own = np.diag(sim)  # (N,)
    successes = np.zeros(num_videos)
    for video in range(num_videos):
        others = np.delete(sim[:, video], video)  # (N - 1,) scores of the other prompts
        # argsort of random keys = one random subset per trial, drawn without replacement
        picks = np.argsort(rng.random((num_trials, num_prompts - 1)), axis=1)[:, :num_distractors]
        best_distractor = others[picks].max(axis=1)  # (num_trials,)
        successes[video] = np.mean(own[video] > best_distractor)
    return float(successes.mean())

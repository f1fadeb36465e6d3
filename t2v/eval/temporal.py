"""Weight-free temporal quality metrics in the spirit of VBench.

Videos are (N, T, H, W, 3) arrays or lists of (T, H, W, 3) arrays (lengths may differ), numpy or torch.
uint8 videos are in [0, 255]; floating videos must lie in [0, 1] and are scaled by 255. Every error
below is therefore in [0, 255] pixel units; ``as_score=True`` gives VBench's ``1 - error / 255``.

- ``temporal_flicker``: mean absolute difference of consecutive frames.
- ``motion_smoothness``: mean absolute error of frame t predicted as the mean of frames t-1 and t+1
  (VBench uses a frame-interpolation network; linear interpolation is its weight-free stand-in).
- ``dynamic_degree``: share of videos whose motion magnitude exceeds a threshold. VBench averages
  the largest 5% of optical-flow magnitudes; the flow-free proxy here averages the largest 5% of
  per-pixel absolute frame differences, so a small moving object on a still background counts as
  motion (the whole-frame mean would dilute it).
- ``seam_profile``: for a clip continued from frame ``seam`` on (extension), frame difference and
  motion-smoothness error across the seam beside their means inside the given and the generated part.
"""

from __future__ import annotations

import numpy as np


def _as_videos(videos, min_frames: int) -> list[np.ndarray]:
    """Videos as a list of float64 (T, H, W, C) arrays in [0, 255]."""
    if hasattr(videos, "detach"):
        videos = videos.detach().cpu().numpy()
    if isinstance(videos, np.ndarray):
        if videos.ndim != 5:
            raise ValueError(f"videos array must be (N, T, H, W, 3), got shape {videos.shape}")
        videos = list(videos)
    if len(videos) == 0:
        raise ValueError("videos is empty")
    out = []
    for i, video in enumerate(videos):
        if hasattr(video, "detach"):
            video = video.detach().cpu().numpy()
        video = np.asarray(video)
        if video.ndim != 4 or video.shape[-1] not in (1, 3):
            raise ValueError(f"video {i} must be (T, H, W, 3), got shape {video.shape}")
        if video.shape[0] < min_frames:
            raise ValueError(f"video {i} has {video.shape[0]} frames; this metric needs >= {min_frames}")
        if video.dtype == np.uint8:
            out.append(video.astype(np.float64))
        elif np.issubdtype(video.dtype, np.floating):
            if not np.isfinite(video).all() or video.min() < 0 or video.max() > 1:
                raise ValueError(
                    f"float video {i} must lie in [0, 1], got range [{video.min()}, {video.max()}]"
                )
            out.append(video.astype(np.float64) * 255.0)
        else:
            raise ValueError(f"video {i} must be uint8 or floating, got dtype {video.dtype}")
    return out


def _reduce(errors: np.ndarray, per_video: bool, as_score: bool):
    values = 1.0 - errors / 255.0 if as_score else errors
    return values if per_video else float(values.mean())


def frame_difference(videos) -> np.ndarray:
    """(N,) mean absolute difference of consecutive frames per video, in [0, 255]."""
    return np.array([np.abs(np.diff(video, axis=0)).mean() for video in _as_videos(videos, 2)])


def temporal_flicker(videos, per_video: bool = False, as_score: bool = False):
    """Mean absolute consecutive-frame difference in [0, 255] (or ``1 - mad / 255``)."""
    return _reduce(frame_difference(videos), per_video, as_score)


def motion_smoothness(videos, per_video: bool = False, as_score: bool = False):
    """Mean absolute error of ``(frame[t-1] + frame[t+1]) / 2`` against ``frame[t]``, in [0, 255]."""
    errors = []
    for video in _as_videos(videos, 3):
        predicted = (video[:-2] + video[2:]) / 2.0  # (T - 2, H, W, C)
        errors.append(np.abs(predicted - video[1:-1]).mean())
    return _reduce(np.array(errors), per_video, as_score)


def motion_magnitude(videos, top_fraction: float = 0.05) -> np.ndarray:
    """(N,) mean over frame pairs of the largest ``top_fraction`` of per-pixel absolute differences.

    A pixel's difference is averaged over channels, in [0, 255].
    """
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    out = []
    for video in _as_videos(videos, 2):
        diff = np.abs(np.diff(video, axis=0)).mean(axis=-1)  # (T - 1, H, W)
        diff = diff.reshape(len(diff), -1)  # (T - 1, H * W)
        k = max(1, int(np.ceil(top_fraction * diff.shape[1])))
        top = -np.sort(-diff, axis=1)[:, :k]  # (T - 1, k) largest first
        out.append(top.mean())
    return np.array(out)


def dynamic_degree(videos, threshold: float, top_fraction: float = 0.05, per_video: bool = False):
    """Share of videos whose ``motion_magnitude`` (in [0, 255]) exceeds ``threshold``."""
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0 (in [0, 255] pixel units), got {threshold}")
    moving = motion_magnitude(videos, top_fraction) > threshold
    return moving if per_video else float(moving.mean())


def seam_profile(videos, seam: int) -> dict[str, dict[str, np.ndarray]]:
    """Temporal metrics across a seam, per video: frames ``seam``.. continue frames ..``seam - 1``.

    ``{"frame_difference": {...}, "motion_smoothness": {...}}``, each ``{"seam", "given", "generated"}`` of
    (N,) errors in [0, 255]. frame_difference: the mean absolute difference of frames ``seam - 1`` and
    ``seam`` ("seam"), and of the consecutive pairs inside frames ``[0, seam)`` ("given") and inside
    ``[seam, T)`` ("generated"). motion_smoothness: the error of ``(frame[t-1] + frame[t+1]) / 2`` against
    ``frame[t]`` (as ``motion_smoothness``) averaged over the triples that straddle the seam (t = seam - 1,
    seam), and over the triples inside each part. A jump at the seam raises "seam" above both parts; a clip
    with no seam (a real one) gives the reference.
    """
    videos = _as_videos(videos, 1)
    if seam < 3:
        raise ValueError(f"seam {seam} leaves fewer than 3 given frames; the seam profile needs 3 on each side")
    out = {name: {part: [] for part in ("seam", "given", "generated")}
           for name in ("frame_difference", "motion_smoothness")}
    for i, video in enumerate(videos):
        if len(video) - seam < 3:
            raise ValueError(f"video {i} has {len(video)} frames: fewer than 3 after seam {seam}")
        steps = np.abs(np.diff(video, axis=0)).mean(axis=(1, 2, 3))  # (T - 1,): pair (t, t + 1) at t
        interpolation = np.abs((video[:-2] + video[2:]) / 2.0 - video[1:-1]).mean(axis=(1, 2, 3))  # (T - 2,): centre t at t - 1
        parts = {
            "frame_difference": (steps[seam - 1], steps[: seam - 1], steps[seam:]),
            "motion_smoothness": (interpolation[seam - 2 : seam].mean(), interpolation[: seam - 2],
                                  interpolation[seam:]),
        }
        for name, (at_seam, given, generated) in parts.items():
            out[name]["seam"].append(at_seam)
            out[name]["given"].append(given.mean())
            out[name]["generated"].append(generated.mean())
    return {name: {part: np.array(values) for part, values in parts.items()} for name, parts in out.items()}

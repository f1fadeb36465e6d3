"""Video files in and out: clips decoded (PyAV) and images (PIL) into fixed-size uint8 arrays, and videos written.

`read_clip` returns (T, H, W, 3) uint8 (`read_frames`: a file's first frames). Frames are sampled at a target fps by nearest-frame lookup
on the stream's own timestamps, resized so the frame covers (height, width) with its aspect kept,
then centre-cropped. Files that cannot be used raise a `BadSample` subclass whose `reason` is one
of `SKIP_REASONS`, so a data loader can skip and count them. `write_video` writes (T, H, W, 3) uint8 as
mp4 or gif.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, UnidentifiedImageError

from t2v.data.manifest import is_image_path

SKIP_REASONS = ("missing", "corrupt", "too_short")
VIDEO_FORMATS = ("mp4", "gif")


class BadSample(Exception):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    reason = "corrupt"


class VideoDecodeError(BadSample):
    """The file is missing (reason "missing") or cannot be decoded (reason "corrupt")."""

    def __init__(self, path: str, detail: str, reason: str = "corrupt"):
        super().__init__(f"cannot read {path!r}: {detail}")
        self.path = path
        self.reason = reason


class ClipTooShort(BadSample):
    """The file has fewer frames than the requested clip needs."""

    reason = "too_short"

    def __init__(self, path: str, detail: str):
        super().__init__(f"{path!r} is too short: {detail}")
        self.path = path


def cover_and_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Float frames (T, C, h, w) resized (bilinear, antialiased) to cover (height, width) with their aspect kept,
    then centre-cropped: (T, C, height, width). The one resize rule of decoded clips and given frames."""
    src_h, src_w = frames.shape[-2:]
    scale = max(height / src_h, width / src_w)
    new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    if (new_h, new_w) != (src_h, src_w):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[..., top : top + height, left : left + width]


def resize_and_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (T, h, w, 3) uint8 frames to cover (height, width) keeping aspect, then centre-crop."""
    if frames.shape[1:3] == (height, width):
        return np.ascontiguousarray(frames)
    x = cover_and_crop(rearrange(torch.from_numpy(frames), "t h w c -> t c h w").float(), height, width)
    return np.ascontiguousarray(rearrange(x.round().clamp(0, 255).to(torch.uint8), "t c h w -> t h w c").numpy())


def _read_image(path: str, num_frames: int) -> np.ndarray:
    if num_frames != 1:
        raise ClipTooShort(path, f"an image is 1 frame, {num_frames} requested")
    try:
        with Image.open(path) as image:
            pixels = np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise VideoDecodeError(path, str(e)) from e
    return pixels[None]  # (1, h, w, 3)


def _stream_duration(container, stream, src_fps: float) -> float | None:
    """Seconds of video, from the stream header, the container or the frame count."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base: container durations are in microseconds
    if stream.frames:
        return stream.frames / src_fps
    return None


def _decode_nearest(container, stream, targets: np.ndarray, src_fps: float, path: str) -> list[np.ndarray]:
    """Decode the frames nearest to each target time (seconds from the stream start)."""
    start_pts = stream.start_time or 0
    time_base = float(stream.time_base)
    first_target = float(targets[0])
    if first_target > 0:
        # Seek to the keyframe before the first target; frames before it are decoded and passed over.
        seek_seconds = max(0.0, first_target - 1.0 / src_fps)
        container.seek(start_pts + int(seek_seconds / time_base), stream=stream, backward=True, any_frame=False)

    picked: list[np.ndarray] = []
    previous, previous_time = None, None
    k = 0
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        time = (frame.pts - start_pts) * time_base
        # Assign every target that lies at or before this frame to the nearer of (previous, this).
        while k < len(targets) and time >= targets[k]:
            use_previous = previous is not None and (targets[k] - previous_time) <= (time - targets[k])
            picked.append((previous if use_previous else frame).to_ndarray(format="rgb24"))
            k += 1
        if k == len(targets):
            return picked
        previous, previous_time = frame, time

    # Past the last frame: targets within half a frame of it still take it.
    while previous is not None and k < len(targets) and targets[k] - previous_time <= 0.5 / src_fps:
        picked.append(previous.to_ndarray(format="rgb24"))
        k += 1
    if k < len(targets):
        last = "no frames" if previous is None else f"the last frame is at {previous_time:.3f}s"
        raise ClipTooShort(path, f"needs a frame at {targets[-1]:.3f}s but {last}")
    return picked


def _read_video(path, num_frames, fps, start, rng) -> np.ndarray:
    import av  # imported here so that training on cached latents or generated data needs no PyAV

    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(path, str(e)) from e
    with container:
        if not container.streams.video:
            raise VideoDecodeError(path, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise VideoDecodeError(path, "the stream has no frame rate")
        src_fps = float(rate)
        step = 1.0 / (fps if fps is not None else src_fps)
        span = (num_frames - 1) * step  # seconds from the first to the last sampled frame
        duration = _stream_duration(container, stream, src_fps)
        last_frame_time = None if duration is None else duration - 1.0 / src_fps

        # 1. start time
        if start is None:
            start_time = 0.0
        elif start == "random":
            if last_frame_time is None:
                start_time = 0.0
            else:
                latest = last_frame_time - span
                if latest < -0.5 / src_fps:
                    raise ClipTooShort(path, f"{num_frames} frames at {1 / step:g} fps need {span:.3f}s, "
                                       f"the video has {max(last_frame_time, 0):.3f}s")
                rng = rng if rng is not None else np.random.default_rng()
                start_time = float(rng.uniform(0.0, max(latest, 0.0)))
        else:
            start_time = float(start)
        if last_frame_time is not None and start_time + span > last_frame_time + 0.5 / src_fps:
            raise ClipTooShort(path, f"{num_frames} frames at {1 / step:g} fps from {start_time:.3f}s end at "
                               f"{start_time + span:.3f}s, the last frame is at {last_frame_time:.3f}s")

        # 2. nearest frames to the target times
        targets = start_time + step * np.arange(num_frames)
        try:
            frames = _decode_nearest(container, stream, targets, src_fps, path)
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise VideoDecodeError(path, str(e)) from e
    return np.stack(frames)  # (T, h, w, 3)


def read_clip(
    path: str,
    num_frames: int,
    fps: float | None = None,
    *,
    height: int,
    width: int,
    start: None | str | float = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Read `num_frames` frames as uint8 (T, height, width, 3).

    fps: sampling rate; None takes every frame of the stream.
    start: None (the beginning), "random" (uniform over the valid starts, drawn from `rng`) or seconds.
    Images (by extension) return (1, height, width, 3). Raises VideoDecodeError or ClipTooShort.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames {num_frames} must be at least 1")
    if height < 1 or width < 1:
        raise ValueError(f"clip size {height}x{width} must be positive")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps {fps} must be positive or None")
    if isinstance(start, str) and start != "random":
        raise ValueError(f"start {start!r} must be None, 'random' or seconds")
    if isinstance(start, (int, float)) and start < 0:
        raise ValueError(f"start {start} seconds must be non-negative")
    if "://" not in path and not os.path.exists(path):
        raise VideoDecodeError(path, "no such file", reason="missing")

    if is_image_path(path):
        frames = _read_image(path, num_frames)
    else:
        frames = _read_video(path, num_frames, fps, start, rng)
    return resize_and_crop(frames, height, width)


def read_frames(path: str, max_frames: int, *, height: int, width: int) -> np.ndarray:
    """The first frames of a video (every frame of the stream, at most `max_frames`), or an image as one
    frame, as uint8 (T, height, width, 3) resized and cropped as `read_clip` does. Raises VideoDecodeError."""
    if max_frames < 1:
        raise ValueError(f"max_frames {max_frames} must be at least 1")
    if not os.path.exists(path):
        raise VideoDecodeError(path, "no such file", reason="missing")
    if is_image_path(path):
        return resize_and_crop(_read_image(path, 1), height, width)
    import av

    frames = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            for frame in container.decode(container.streams.video[0]):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == max_frames:
                    break
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(path, str(e)) from e
    if not frames:
        raise VideoDecodeError(path, "no frames")
    return resize_and_crop(np.stack(frames), height, width)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int) -> None:
    """Write uint8 (T, H, W, 3) frames; the format is the path's extension, one of VIDEO_FORMATS.

    mp4 is H.264 in yuv444p at crf 5: no chroma subsampling, so flat colours and small shapes survive the
    file within a few levels (yuv420p blurs the colour of a 10-pixel object).
    """
    fmt = os.path.splitext(str(path))[1].lstrip(".").lower()
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"video path {str(path)!r} must end in one of {[f'.{f}' for f in VIDEO_FORMATS]}")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if fmt == "gif":
        from diffusers.utils import export_to_gif

        export_to_gif([Image.fromarray(frame) for frame in frames], str(path), fps=fps)
        return
    import imageio.v2 as imageio

    with imageio.get_writer(str(path), format="FFMPEG", fps=fps, codec="libx264", quality=None,
                            pixelformat="yuv444p", macro_block_size=1, output_params=["-crf", "5"],
                            ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(frame)

"""A self-contained HTML evaluation report: metric tables, animated videos, similarity matrix, ranks.

Everything is inline (base64 GIF/PNG drawn with PIL and numpy), so ``report.html`` can be mailed or
opened from any folder.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw

# Viridis sampled at 0, 0.25, 0.5, 0.75, 1 (RGB); values in between are interpolated.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def write_json(path: str, result: dict) -> None:
    """Write `result` to `path` (its folder created) through a temporary file, so no half-written file is left."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(f"{path}.tmp", path)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape S) -> uint8 RGB (S, 3) on a viridis-like ramp."""
    x = np.clip(np.asarray(values, dtype=np.float64), 0, 1) * (len(_VIRIDIS) - 1)
    low = np.floor(x).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (x - low)[..., None]
    return (_VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac).round().astype(np.uint8)


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def video_gif_base64(video: np.ndarray, max_side: int = 128, fps: int = 8, max_frames: int = 32) -> str:
    """uint8 (T, H, W, 3) -> base64 GIF, downscaled to ``max_side`` and at most ``max_frames`` frames."""
    video = np.asarray(video)
    if video.ndim != 4 or video.dtype != np.uint8:
        raise ValueError(f"video must be uint8 (T, H, W, 3), got {video.dtype} {video.shape}")
    step = max(1, -(-len(video) // max_frames))  # ceil division
    frames = [Image.fromarray(frame) for frame in video[::step]]
    scale = min(1.0, max_side / max(frames[0].size))
    size = (max(1, round(frames[0].width * scale)), max(1, round(frames[0].height * scale)))
    frames = [frame.resize(size, Image.BILINEAR) if scale < 1 else frame for frame in frames]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:],
                   duration=max(20, round(1000 * step / fps)), loop=0)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def similarity_png_base64(sim: np.ndarray, min_size: int = 256) -> str:
    """(M, N) matrix as a heat map PNG (min to max of ``sim``), each cell an integer square of pixels."""
    sim = np.asarray(sim, dtype=np.float64)
    low, high = sim.min(), sim.max()
    normalised = (sim - low) / (high - low) if high > low else np.zeros_like(sim)
    cell = max(1, -(-min_size // max(sim.shape)))
    pixels = np.repeat(np.repeat(colormap(normalised), cell, axis=0), cell, axis=1)  # (M*cell, N*cell, 3)
    return _png_base64(Image.fromarray(pixels))


def rank_histogram_png_base64(
    ranks: np.ndarray, num_candidates: int, max_bins: int = 50, width: int = 480, height: int = 200
) -> str:
    """Bar chart of how many queries got each rank 1 .. num_candidates (equal-width bins beyond ``max_bins``)."""
    edges = np.linspace(0.5, num_candidates + 0.5, min(num_candidates, max_bins) + 1)
    counts, _ = np.histogram(np.clip(ranks, 1, num_candidates), bins=edges)  # (bins,)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, bottom, top = 30, height - 20, 16
    bar = (width - left - 10) / len(counts)
    peak = max(int(counts.max()), 1)
    for index, count in enumerate(counts):
        x0 = left + index * bar
        y0 = bottom - (bottom - top) * count / peak
        draw.rectangle([x0 + 0.1 * bar, y0, x0 + 0.9 * bar, bottom], fill=(59, 82, 139))
    draw.line([left, bottom, width - 10, bottom], fill="black")
    draw.text((2, top - 12), f"max {peak}", fill="black")
    draw.text((left, bottom + 4), "rank 1", fill="black")
    draw.text((width - 70, bottom + 4), f"rank {num_candidates}", fill="black")
    return _png_base64(image)


def flatten(metrics: dict, prefix: str = "") -> dict[str, object]:
    """Nested dict -> ``{"a/b/c": value}``."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(rows: dict) -> str:
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{_format(v)}</td></tr>" for k, v in rows.items())
    return f"<table><tr><th>metric</th><th>value</th></tr>{body}</table>"


_STYLE = """
body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; margin-bottom: 1em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; font-size: 13px; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.card { width: 180px; font-size: 12px; }
.card img { max-width: 176px; image-rendering: pixelated; border: 1px solid #ccc; }
.hit { color: #17803d; } .miss { color: #b3261e; }
"""


def write_report(
    path: str | os.PathLike,
    metrics: dict,
    cards: list[dict],
    sim: np.ndarray,
    t2v_ranks: np.ndarray,
    title: str = "t2v evaluation",
) -> None:
    """Write ``report.html``.

    Args:
        metrics: nested metrics (as in ``metrics.json``), shown flattened.
        cards: one dict per shown video: ``gif`` (base64 from ``video_gif_base64``), ``prompt``, ``rank``
            (its prompt's text-to-video rank) and optional ``scores`` (name -> value).
        sim: (num_prompts, num_videos) similarity matrix.
        t2v_ranks: (num_prompts,) text-to-video ranks for the histogram.
    """
    sim = np.asarray(sim)
    card_html = []
    for card in cards:
        rank = card["rank"]
        scores = "".join(f"<br>{html.escape(k)}: {_format(v)}" for k, v in card.get("scores", {}).items())
        card_html.append(
            f'<div class="card"><img src="data:image/gif;base64,{card["gif"]}"><br>'
            f"{html.escape(card['prompt'])}<br>"
            f'<span class="{"hit" if rank <= 1 else "miss"}">rank {_format(rank)}</span>{scores}</div>'
        )
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<h2>Metrics</h2>
{_table(flatten(metrics))}
<h2>Videos ({len(cards)} of {sim.shape[1]} shown; rank = where the prompt retrieves its own video)</h2>
<div class="grid">{"".join(card_html)}</div>
<h2>Similarity matrix (rows: prompts, columns: videos; {sim.min():.3g} dark to {sim.max():.3g} bright)</h2>
<img src="data:image/png;base64,{similarity_png_base64(sim)}">
<h2>Text-to-video rank histogram</h2>
<img src="data:image/png;base64,{rank_histogram_png_base64(t2v_ranks, sim.shape[1])}">
</body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)

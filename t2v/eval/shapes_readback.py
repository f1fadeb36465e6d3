"""Shapes World attribute read-back: the world's exact metric, read from pixels with no learned model.

`read_back(video)` recovers a record (background, and per object colour, shape, size, motion, start)
from a uint8 (T, H, W, 3) clip; `score` compares it with the ground truth; `attribute_accuracy` averages
over a set. Each pixel is explained as a blend between the background and one palette colour, so edges
softened by video compression or a generator still count for the right colour. Messy videos never
raise: undecidable attributes read back as "unknown", missing objects are simply absent.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from t2v.data.shapes import BACKGROUNDS, COLOURS, SIZES

ATTRIBUTES = ("background", "colour", "shape", "size", "motion")
# A pixel belongs to a colour when it is at least this far along the line from background to colour...
MIN_ALPHA = 0.5
# ...and at most this far (RGB Euclidean) from that line.
MAX_RESIDUAL = 80.0
# An object is its colour's largest 4-connected component with at least this many pixels in a frame
# (a small triangle has 61), present in at least half of the frames.
MIN_PIXELS = 20
# Bounding-box fill ratio: square 1.0, circle 0.67-0.70 (pixel disc), triangle 0.50; thresholds between.
SQUARE_FILL, CIRCLE_FILL, MIN_FILL = 0.85, 0.59, 0.3
# With shape_method="template": the best template must overlap the object at least this much (IoU).
MIN_IOU = 0.6
SHAPE_METHODS = ("fill", "template")
# Bounding-box side 2 r + 1: small 11, large 19; split half way, unknown beyond a gap as wide again.
_SMALL_SIDE, _LARGE_SIDE = 2 * SIZES["small"] + 1, 2 * SIZES["large"] + 1
SIZE_SIDE = (_SMALL_SIDE + _LARGE_SIDE) / 2
MIN_SIDE, MAX_SIDE = _SMALL_SIDE - (SIZE_SIDE - _SMALL_SIDE), _LARGE_SIDE + (_LARGE_SIDE - SIZE_SIDE)
# Centroid displacement between first and last frames below which an object is staying still (ideal 32).
STILL_PIXELS = 8.0

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (K, 3)
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def _background(frame: np.ndarray) -> tuple[str, np.ndarray]:
    """Nearest of black/white to the median border colour of `frame` (H, W, 3), and that median colour."""
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]]).astype(np.float32)  # (N, 3)
    median = np.median(border, axis=0)
    names = list(BACKGROUNDS)
    distances = [np.linalg.norm(median - np.array(BACKGROUNDS[name], dtype=np.float32)) for name in names]
    return names[int(np.argmin(distances))], median


def _colour_labels(video: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Palette index per pixel (T, H, W), -1 for background or unexplained pixels."""
    # Work on the distinct colours only: a few dozen for rendered or compressed clips.
    packed = (video[..., 0].astype(np.int32) << 16) | (video[..., 1].astype(np.int32) << 8) | video[..., 2]
    unique, inverse = np.unique(packed.ravel(), return_inverse=True)
    rgb = np.stack([unique >> 16, (unique >> 8) & 255, unique & 255], axis=-1).astype(np.float32)  # (N, 3)
    pixels = rgb - bg  # (N, 3)
    directions = _PALETTE - bg  # (K, 3)
    lengths = np.maximum((directions**2).sum(-1), 1.0)  # (K,)
    dots = pixels @ directions.T  # (N, K)
    alpha = np.clip(dots / lengths, 0.0, 1.0)  # (N, K)
    # |p - alpha d|^2 for each palette colour's background-to-colour segment
    residual = np.sqrt(np.maximum((pixels**2).sum(-1, keepdims=True) - 2 * alpha * dots + alpha**2 * lengths, 0))
    best = residual.argmin(-1)  # (N,)
    rows = np.arange(len(best))
    keep = (alpha[rows, best] >= MIN_ALPHA) & (residual[rows, best] <= MAX_RESIDUAL)
    return np.where(keep, best, -1)[inverse].reshape(packed.shape)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=_FOUR_CONNECTED)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(sizes.argmax()) + 1)


def _shape_by_fill(fill: float) -> str:
    """The contract's rule: how much of its bounding box the object fills."""
    if fill >= SQUARE_FILL:
        return "square"
    if fill >= CIRCLE_FILL:
        return "circle"
    return "triangle" if fill >= MIN_FILL else "unknown"


def _shape_by_template(mask: np.ndarray) -> str:
    """The shape whose template, scaled to the mask's area and placed on its centroid, overlaps it best.

    Blur-tolerant alternative to the fill rule: a blurred small circle loses its one-pixel tips at
    (cx +- r, cy) and (cx, cy +- r) and then fills its box like a square, yet still fits a disc best.
    """
    ys, xs = np.nonzero(mask)
    area, mx, my = len(xs), xs.mean(), ys.mean()
    gy, gx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    radius = np.sqrt(area / np.pi)
    half = np.sqrt(area) / 2
    tri_r = np.sqrt(area / 2)  # triangle area is 2 r^2; its centroid lies r / 3 below its centre
    tri_dy = gy - (my - tri_r / 3)
    templates = {
        "circle": (gx - mx) ** 2 + (gy - my) ** 2 <= radius**2,
        "square": (np.abs(gx - mx) < half) & (np.abs(gy - my) < half),
        "triangle": (tri_dy >= -tri_r) & (tri_dy <= tri_r) & (2 * np.abs(gx - mx) <= tri_dy + tri_r),
    }
    ious = {name: (mask & t).sum() / max((mask | t).sum(), 1) for name, t in templates.items()}
    best = max(ious, key=ious.get)
    return best if ious[best] >= MIN_IOU else "unknown"


def _read_object(masks: list[np.ndarray | None], shape_method: str) -> dict | None:
    """Shape, size, motion and start of one colour from its per-frame masks (None where absent)."""
    present = [f for f, mask in enumerate(masks) if mask is not None]
    if len(present) < (len(masks) + 1) // 2:  # present in fewer than half of the frames
        return None
    sides, fills, votes, centroids, centres = [], [], [], {}, {}
    for f in present:
        ys, xs = np.nonzero(masks[f])
        width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        sides.append(max(width, height))
        fills.append(len(xs) / float(width * height))
        if shape_method == "template":
            votes.append(_shape_by_template(masks[f]))
        centroids[f] = (xs.mean(), ys.mean())
        centres[f] = (int(round((xs.max() + xs.min()) / 2)), int(round((ys.max() + ys.min()) / 2)))
    side = float(np.median(sides))

    if shape_method == "template":
        shape = max(sorted(set(votes)), key=votes.count)
    else:
        shape = _shape_by_fill(float(np.median(fills)))
    if MIN_SIDE <= side < SIZE_SIDE:
        size = "small"
    elif SIZE_SIDE <= side <= MAX_SIDE:
        size = "large"
    else:
        size = "unknown"

    (x_first, y_first), (x_last, y_last) = centroids[present[0]], centroids[present[-1]]
    dx, dy = x_last - x_first, y_last - y_first
    if np.hypot(dx, dy) < STILL_PIXELS:
        motion = "staying still"
    elif abs(dx) >= abs(dy):
        motion = "moving right" if dx > 0 else "moving left"
    else:
        motion = "moving down" if dy > 0 else "moving up"
    return {"shape": shape, "size": size, "motion": motion, "start": list(centres[present[0]])}


def read_back(video: np.ndarray, shape_method: str = "fill") -> dict:
    """Read a record from a uint8 (T, H, W, 3) clip: background and objects (with an estimated start).

    shape_method: "fill" (the contract's bounding-box fill rule, exact on rendered and encoded clips) or
    "template" (best-overlapping area-scaled template; more tolerant of blurred generated clips).
    """
    if shape_method not in SHAPE_METHODS:
        raise ValueError(f"shape_method {shape_method!r} is not one of {list(SHAPE_METHODS)}")
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or min(video.shape[:3]) < 2:
        raise ValueError(
            f"video of shape {video.shape} and dtype {video.dtype} must be uint8 (T, H, W, 3) with T, H, W >= 2"
        )
    background, bg = _background(video[0])
    labels = _colour_labels(video, bg)  # (T, H, W)
    # Pixels per frame and colour: (T, K); colours short of MIN_PIXELS in half the frames are skipped.
    counts = np.stack([np.bincount(f[f >= 0], minlength=len(COLOURS)) for f in labels])
    needed = (len(labels) + 1) // 2
    objects = []
    for index, colour in enumerate(COLOURS):
        if (counts[:, index] >= MIN_PIXELS).sum() < needed:
            continue
        masks = []
        for frame_labels in labels:
            mask = frame_labels == index
            if mask.sum() >= MIN_PIXELS:
                mask = _largest_component(mask)
            masks.append(mask if mask.sum() >= MIN_PIXELS else None)
        obj = _read_object(masks, shape_method)
        if obj is not None:
            objects.append({"colour": colour, **obj})
    return {"background": background, "objects": objects}


def score(pred: dict, truth: dict) -> dict[str, bool]:
    """Per-attribute correctness of a read-back `pred` against `truth`, matching objects by colour.

    colour is right when the predicted colours are exactly the true ones (no missing, no extra objects);
    shape, size and motion are right when every true object is found with that attribute right; `all`
    needs everything right.
    """
    for name, record in (("pred", pred), ("truth", truth)):
        if not isinstance(record, dict) or "background" not in record or "objects" not in record:
            raise ValueError(f"{name} {record!r} must be a record with 'background' and 'objects'")
    by_colour = {obj["colour"]: obj for obj in pred["objects"]}
    result = {
        "background": pred["background"] == truth["background"],
        "colour": sorted(by_colour) == sorted(obj["colour"] for obj in truth["objects"]),
    }
    for attribute in ("shape", "size", "motion"):
        result[attribute] = all(
            obj["colour"] in by_colour and by_colour[obj["colour"]][attribute] == obj[attribute]
            for obj in truth["objects"]
        )
    result["all"] = all(result[attribute] for attribute in ATTRIBUTES)
    return result


def attribute_accuracy(videos, records: list[dict], shape_method: str = "fill") -> dict[str, float]:
    """Rates in [0, 1] of each attribute and of `all` over clips uint8 (N, T, H, W, 3) and their records."""
    if len(videos) != len(records):
        raise ValueError(f"{len(videos)} videos and {len(records)} records must be the same number")
    if len(records) == 0:
        raise ValueError("attribute_accuracy needs at least one video")
    totals = dict.fromkeys((*ATTRIBUTES, "all"), 0)
    for video, record in zip(videos, records):
        if hasattr(video, "detach"):  # torch tensor
            video = video.detach().cpu().numpy()
        for attribute, correct in score(read_back(video, shape_method), record).items():
            totals[attribute] += int(correct)
    return {attribute: total / len(records) for attribute, total in totals.items()}


__all__ = ["attribute_accuracy", "read_back", "score"]

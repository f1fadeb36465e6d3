"""Shapes World attribute read-back: the world's exact metric, read from pixels with no learned model.

`read_back(video)` recovers a record (background, and per object colour, shape, size, motion, start)
from a uint8 (T, H, W, 3) clip; `score` compares it with the ground truth; `attribute_accuracy` averages
over a set. Each pixel is explained as a blend between the background and one palette colour, so edges
softened by video compression or a generator still count for the right colour. Messy videos never
raise: undecidable attributes read back as "unknown", missing objects are simply absent.

Shape, by default ("template"), is the shape whose template best matches the object's soft coverage
(the blend factor of each pixel), searched over sizes near the measured one, positions within a pixel
of the measured centre and edge softness (Gaussian blur up to 1.5 px), so a soft-edged circle is a
circle. Calibration (tests/test_shapes.py): 100% on clean renders, at least 95% all-correct on
one-object renders blurred by a 1-pixel Gaussian plus colour noise, shuffled records at chance. The
older bounding-box fill rule ("fill") turns on single pixels and stays available as an option.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from t2v.data.shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES, shape_mask

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
# With shape_method="template": template radii searched around the measured one (integers, +-2), edge
# softness (Gaussian sigma, px) and centre offsets (px); the best template must reach this soft IoU.
TEMPLATE_RADII = range(2, 15)
TEMPLATE_SIGMAS = (0.0, 0.5, 1.0, 1.5)
TEMPLATE_OFFSETS = (-1, 0, 1)
MIN_SOFT_IOU = 0.5
SHAPE_METHODS = ("template", "fill")
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


def _colour_fit(video: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best palette index per pixel (T, H, W), -1 where no colour explains it, and its blend factor alpha.

    alpha in [0, 1] is how far the pixel lies along the line from the background to that colour.
    """
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
    best_alpha = np.where(residual[rows, best] <= MAX_RESIDUAL, alpha[rows, best], 0.0)
    best = np.where(best_alpha > 0, best, -1)
    return best[inverse].reshape(packed.shape), best_alpha[inverse].reshape(packed.shape).astype(np.float32)


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


@functools.cache
def _template_bank() -> tuple[int, np.ndarray]:
    """Half size H and soft templates (shapes, radii, sigmas, 2H + 1, 2H + 1) centred on the canvas."""
    half = max(TEMPLATE_RADII) + int(np.ceil(3 * max(TEMPLATE_SIGMAS)))
    offsets = np.arange(-half, half + 1)
    bank = np.zeros((len(SHAPES), len(TEMPLATE_RADII), len(TEMPLATE_SIGMAS), 2 * half + 1, 2 * half + 1), np.float32)
    for s in range(len(SHAPES)):
        for i, r in enumerate(TEMPLATE_RADII):
            inside = shape_mask(s, r, offsets[None, :], offsets[:, None]).astype(np.float32)  # (dy, dx)
            for j, sigma in enumerate(TEMPLATE_SIGMAS):
                bank[s, i, j] = ndimage.gaussian_filter(inside, sigma, mode="constant") if sigma else inside
    return half, bank


def _shape_by_template(soft: np.ndarray, side: float, centre: tuple[int, int]) -> str:
    """The shape whose soft template best matches the coverage `soft` (H, W) in [0, 1] (soft IoU).

    Templates are the renderer's own shapes at radii within 2 px of the measured one ((side - 1) / 2),
    centred within a pixel of the measured centre, with edges softened by a Gaussian of each sigma.
    """
    half, bank = _template_bank()
    radius = int(round((side - 1) / 2))
    picked = [i for i, r in enumerate(TEMPLATE_RADII) if abs(r - radius) <= 2]
    if not picked:
        return "unknown"
    padded = np.pad(soft, half + 1)
    cx, cy = centre
    windows = np.stack([
        padded[cy + oy + 1 : cy + oy + 2 * half + 2, cx + ox + 1 : cx + ox + 2 * half + 2]
        for oy in TEMPLATE_OFFSETS for ox in TEMPLATE_OFFSETS
    ])  # (O, 2H + 1, 2H + 1)
    templates = bank[:, picked]  # (S, R, G, 2H + 1, 2H + 1)
    w = windows[:, None, None, None]
    iou = np.minimum(w, templates).sum((-1, -2)) / np.maximum(np.maximum(w, templates).sum((-1, -2)), 1e-6)
    best = iou.reshape(len(windows), len(SHAPES), -1).max(-1).max(0)  # (S,)
    return SHAPES[int(best.argmax())] if best.max() >= MIN_SOFT_IOU else "unknown"


def _read_object(masks: list[np.ndarray | None], softs: list[np.ndarray | None], shape_method: str) -> dict | None:
    """Shape, size, motion and start of one colour from its per-frame masks and soft coverage (None where absent)."""
    present = [f for f, mask in enumerate(masks) if mask is not None]
    if len(present) < (len(masks) + 1) // 2:  # present in fewer than half of the frames
        return None
    sides, fills, votes, centroids, centres = [], [], [], {}, {}
    for f in present:
        ys, xs = np.nonzero(masks[f])
        width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        sides.append(max(width, height))
        fills.append(len(xs) / float(width * height))
        centroids[f] = (xs.mean(), ys.mean())
        centres[f] = (int(round((xs.max() + xs.min()) / 2)), int(round((ys.max() + ys.min()) / 2)))
        if shape_method == "template":
            votes.append(_shape_by_template(softs[f], sides[-1], centres[f]))
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


def colour_fit(video: np.ndarray) -> np.ndarray:
    """Palette index per pixel (T, H, W) of a uint8 (T, H, W, 3) clip, -1 for background or unexplained pixels."""
    best, alpha = _colour_fit(video, _background(video[0])[1])
    return np.where(alpha >= MIN_ALPHA, best, -1)


def read_back(video: np.ndarray, shape_method: str = "template") -> dict:
    """Read a record from a uint8 (T, H, W, 3) clip: background and objects (with an estimated start).

    shape_method: "template" (the best-matching soft shape template, tolerant of soft edges) or "fill"
    (how much of its bounding box the object fills; turns on single pixels at the object's extremes).
    """
    if shape_method not in SHAPE_METHODS:
        raise ValueError(f"shape_method {shape_method!r} is not one of {list(SHAPE_METHODS)}")
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or min(video.shape[:3]) < 2:
        raise ValueError(
            f"video of shape {video.shape} and dtype {video.dtype} must be uint8 (T, H, W, 3) with T, H, W >= 2"
        )
    background, bg = _background(video[0])
    best, alpha = _colour_fit(video, bg)  # (T, H, W) each
    labels = np.where(alpha >= MIN_ALPHA, best, -1)
    # Pixels per frame and colour: (T, K); colours short of MIN_PIXELS in half the frames are skipped.
    counts = np.stack([np.bincount(f[f >= 0], minlength=len(COLOURS)) for f in labels])
    needed = (len(labels) + 1) // 2
    objects = []
    for index, colour in enumerate(COLOURS):
        if (counts[:, index] >= MIN_PIXELS).sum() < needed:
            continue
        masks, softs = [], []
        for frame_best, frame_alpha, frame_labels in zip(best, alpha, labels):
            mask = frame_labels == index
            if mask.sum() >= MIN_PIXELS:
                mask = _largest_component(mask)
            if mask.sum() < MIN_PIXELS:
                masks.append(None)
                softs.append(None)
                continue
            masks.append(mask)
            # the object's soft coverage: its colour's blend factor, near its core only (not other blobs)
            near = ndimage.binary_dilation(mask, iterations=2)
            softs.append(np.where(near & (frame_best == index), frame_alpha, 0.0).astype(np.float32))
        obj = _read_object(masks, softs, shape_method)
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


def attribute_accuracy(videos, records: list[dict], shape_method: str = "template") -> dict[str, float]:
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


__all__ = ["attribute_accuracy", "colour_fit", "read_back", "score"]

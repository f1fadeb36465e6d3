"""Shapes World v1: procedurally rendered video-text data with exact ground truth.

Every number here is part of the world's contract (checked by `tests/test_shapes.py`): 17 frames of 64 x 64 RGB at 8 fps,
a black or white background, one or two flat objects (7 colours, 3 shapes, 2 sizes, 5 motions), and
three (colour, shape) pairs that never appear in training data.

A sample is a JSON record
`{"background": "black", "objects": [{"colour", "shape", "size", "motion", "start": [x, y]}]}`
(`start` is the centre at frame 0, in pixels; pixel (x, y) has its centre at integer coordinates).
`render` draws one record with numpy, `render_batch` draws many at once with torch (bit-identical).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch

from t2v.data.video import write_video

NUM_FRAMES = 17
SIZE = 64
FPS = 8
STEP = 2  # pixels per frame

BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 190, 70),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "orange": (250, 140, 20),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 5, "large": 9}
# Per-frame (dx, dy); image y grows downward.
MOTIONS = {
    "moving left": (-STEP, 0),
    "moving right": (STEP, 0),
    "moving up": (0, -STEP),
    "moving down": (0, STEP),
    "staying still": (0, 0),
}
HELD_OUT = frozenset({("purple", "triangle"), ("cyan", "square"), ("orange", "circle")})

ALL_PAIRS = [(colour, shape) for colour in COLOURS for shape in SHAPES]
TRAIN_PAIRS = [pair for pair in ALL_PAIRS if pair not in HELD_OUT]
HELD_OUT_PAIRS = [pair for pair in ALL_PAIRS if pair in HELD_OUT]
SPLITS = ("train", "heldout", "any")
# With num_objects=None a record has two objects with this probability, else one.
TWO_OBJECT_PROB = 0.5


# ----------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------


def start_range(size: str, motion: str) -> tuple[int, int, int, int]:
    """Inclusive (x_lo, x_hi, y_lo, y_hi) of starts keeping the object inside the frame for all frames."""
    r = SIZES[size]
    dx, dy = MOTIONS[motion]
    travel = NUM_FRAMES - 1
    x_lo, x_hi = r + max(0, -dx * travel), SIZE - 1 - r - max(0, dx * travel)
    y_lo, y_hi = r + max(0, -dy * travel), SIZE - 1 - r - max(0, dy * travel)
    return x_lo, x_hi, y_lo, y_hi


def shape_mask(shape_id: int, r: int, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Inside test for pixels at integer offset (dx, dy) from the centre (arrays broadcast together).

    shape_id: 0 circle (dx^2 + dy^2 <= r^2), 1 square (half-side r), 2 triangle with vertices
    (0, -r), (-r, r), (r, r).
    """
    if shape_id == 0:
        return dx * dx + dy * dy <= r * r
    if shape_id == 1:
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    return (dy >= -r) & (dy <= r) & (2 * np.abs(dx) <= dy + r)


def _object_masks(obj: dict) -> np.ndarray:
    """Boolean masks (T, H, W) of one object over the clip."""
    vx, vy = MOTIONS[obj["motion"]]
    x0, y0 = obj["start"]
    frames = np.arange(NUM_FRAMES)[:, None, None]
    grid = np.arange(SIZE)
    dx = grid[None, None, :] - (x0 + frames * vx)  # (T, 1, W)
    dy = grid[None, :, None] - (y0 + frames * vy)  # (T, H, 1)
    return shape_mask(SHAPES.index(obj["shape"]), SIZES[obj["size"]], dx, dy)


def _overlap(first: dict, second: dict) -> bool:
    """Whether two objects share a pixel in any frame (bounding boxes first, masks only when they meet)."""
    frames = np.arange(NUM_FRAMES)
    centres = []
    for obj in (first, second):
        vx, vy = MOTIONS[obj["motion"]]
        centres.append((obj["start"][0] + frames * vx, obj["start"][1] + frames * vy))
    (x1, y1), (x2, y2) = centres
    reach = SIZES[first["size"]] + SIZES[second["size"]]
    if not ((np.abs(x1 - x2) <= reach) & (np.abs(y1 - y2) <= reach)).any():
        return False
    return bool((_object_masks(first) & _object_masks(second)).any())


def validate_record(record: dict) -> None:
    """Raise ValueError unless `record` follows the contract (keys, spellings, inside the frame)."""
    if not isinstance(record, dict) or set(record) != {"background", "objects"}:
        raise ValueError(f"record {record!r} must be a dict with exactly the keys 'background' and 'objects'")
    if record["background"] not in BACKGROUNDS:
        raise ValueError(f"background {record['background']!r} is not one of {list(BACKGROUNDS)}")
    objects = record["objects"]
    if not isinstance(objects, list) or len(objects) not in (1, 2):
        raise ValueError(f"objects {objects!r} must be a list of 1 or 2 objects")
    keys = {"colour", "shape", "size", "motion", "start"}
    for obj in objects:
        if not isinstance(obj, dict) or set(obj) != keys:
            raise ValueError(f"object {obj!r} must have exactly the keys {sorted(keys)}")
        for key, allowed in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES), ("motion", MOTIONS)):
            if obj[key] not in allowed:
                raise ValueError(f"{key} {obj[key]!r} is not one of {list(allowed)}")
        start = obj["start"]
        if not (isinstance(start, (list, tuple)) and len(start) == 2 and all(isinstance(v, int) for v in start)):
            raise ValueError(f"start {start!r} must be two integers [x, y]")
        x_lo, x_hi, y_lo, y_hi = start_range(obj["size"], obj["motion"])
        if not (x_lo <= start[0] <= x_hi and y_lo <= start[1] <= y_hi):
            raise ValueError(
                f"start {list(start)} of a {obj['size']} object {obj['motion']} leaves the frame; "
                f"x must be in [{x_lo}, {x_hi}] and y in [{y_lo}, {y_hi}]"
            )
    if len(objects) == 2 and objects[0]["colour"] == objects[1]["colour"]:
        raise ValueError(f"two objects share the colour {objects[0]['colour']!r}; colours must differ")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")


def sample_record(rng: np.random.Generator, num_objects: int | None = None, split: str = "train",
                  two_object_prob: float = TWO_OBJECT_PROB) -> dict:
    """Draw one record. Deterministic given `rng`.

    split: "train" never uses a held-out (colour, shape) pair, "heldout" makes one object a held-out pair,
    "any" allows every pair. num_objects: 1, 2, or None (two with probability `two_object_prob`).
    Two objects get different colours and are re-drawn until they overlap in no frame.
    """
    _check_split(split)
    if num_objects is None:
        if not 0.0 <= two_object_prob <= 1.0:
            raise ValueError(f"two_object_prob {two_object_prob} must be in [0, 1]")
        num_objects = 2 if rng.random() < two_object_prob else 1
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects {num_objects!r} must be 1, 2 or None")
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    heldout_index = int(rng.integers(num_objects)) if split == "heldout" else -1
    for _ in range(1000):
        objects = []
        for index in range(num_objects):
            if index == heldout_index:
                pairs = HELD_OUT_PAIRS
            else:
                pairs = TRAIN_PAIRS if split == "train" else ALL_PAIRS
            used = {obj["colour"] for obj in objects}
            pairs = [pair for pair in pairs if pair[0] not in used]
            colour, shape = pairs[rng.integers(len(pairs))]
            size = list(SIZES)[rng.integers(len(SIZES))]
            motion = list(MOTIONS)[rng.integers(len(MOTIONS))]
            x_lo, x_hi, y_lo, y_hi = start_range(size, motion)
            start = [int(rng.integers(x_lo, x_hi + 1)), int(rng.integers(y_lo, y_hi + 1))]
            obj = {"colour": colour, "shape": shape, "size": size, "motion": motion, "start": start}
            objects.append(obj)
        if num_objects == 1 or not _overlap(*objects):
            return {"background": background, "objects": objects}
    raise RuntimeError("could not place two non-overlapping objects in 1000 tries")


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def render(record: dict) -> np.ndarray:
    """Draw one record: uint8 (T, H, W, 3) = (17, 64, 64, 3)."""
    validate_record(record)
    video = np.empty((NUM_FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    video[:] = BACKGROUNDS[record["background"]]
    for obj in record["objects"]:
        video[_object_masks(obj)] = COLOURS[obj["colour"]]
    return video


def _record_tensors(records: list[dict]) -> dict[str, torch.Tensor]:
    """Pack records into int32 tensors: `bg` (B, 3), `rgb` (B, 2, 3), the rest (B, 2) over object slots.

    An empty second slot is all zeros, so its `valid` is 0.
    """
    backgrounds, slots = [], []
    for record in records:
        validate_record(record)
        backgrounds.append(BACKGROUNDS[record["background"]])
        row = []
        for obj in record["objects"]:
            (x0, y0), (vx, vy) = obj["start"], MOTIONS[obj["motion"]]
            row.append((x0, y0, vx, vy, SIZES[obj["size"]], SHAPES.index(obj["shape"]), 1, *COLOURS[obj["colour"]]))
        slots.append(row + [(0,) * 10] * (2 - len(row)))
    packed = torch.tensor(slots, dtype=torch.int32)  # (B, 2, 10)
    x0, y0, vx, vy, r, shape, valid = packed[..., :7].unbind(-1)
    return {"x0": x0, "y0": y0, "vx": vx, "vy": vy, "r": r, "shape": shape, "valid": valid,
            "rgb": packed[..., 7:], "bg": torch.tensor(backgrounds, dtype=torch.int32)}


def _half_widths() -> np.ndarray:
    """Row half-widths (num_shapes * num_sizes, 2 R + 1), R = largest radius, of the `shape_mask` shapes.

    Every shape is symmetric and convex, so row dy covers exactly |dx| <= half_width[dy]; -1 marks an
    empty row. Rendering by rows makes `render_batch` one comparison per pixel.
    """
    big = max(SIZES.values())
    offsets = np.arange(-big, big + 1)
    table = np.full((len(SHAPES) * len(SIZES), 2 * big + 1), -1, dtype=np.int32)
    for shape_id in range(len(SHAPES)):
        for size_id, r in enumerate(SIZES.values()):
            inside = shape_mask(shape_id, r, offsets[None, :], offsets[:, None])  # (dy, dx)
            for row, cols in enumerate(inside):
                if cols.any():
                    table[shape_id * len(SIZES) + size_id, row] = np.abs(offsets[cols]).max()
    return table


_HALF_WIDTHS = _half_widths()


def render_batch(records: list[dict], device="cpu", chunk_size: int = 1024) -> torch.Tensor:
    """Draw many records at once with torch: uint8 (B, T, H, W, 3), bit-identical to `render`."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size {chunk_size} must be >= 1")
    device = torch.device(device)
    out = torch.empty((len(records), NUM_FRAMES, SIZE, SIZE, 3), dtype=torch.uint8, device=device)
    table = torch.from_numpy(_HALF_WIDTHS).to(device)
    big = max(SIZES.values())
    frames = torch.arange(NUM_FRAMES, device=device, dtype=torch.int32)
    grid = torch.arange(SIZE, device=device, dtype=torch.int32)
    for begin in range(0, len(records), chunk_size):
        t = {k: v.to(device) for k, v in _record_tensors(records[begin : begin + chunk_size]).items()}
        # 1. object centres per frame: (b, k, t)
        cx = t["x0"][:, :, None] + frames * t["vx"][:, :, None]
        cy = t["y0"][:, :, None] + frames * t["vy"][:, :, None]
        dx = (grid - cx[..., None]).abs()  # (b, k, t, W)
        dy = grid - cy[..., None]  # (b, k, t, H)
        # 2. half-width of each pixel row, -1 outside the object or in an empty slot: (b, k, t, H)
        sprite = (t["shape"] * len(SIZES) + (t["r"] == max(SIZES.values())).int())[:, :, None, None]
        row = (dy.clamp(-big, big) + big).long()
        half = table[sprite.long().expand_as(row), row]
        half = torch.where((dy.abs() <= big) & (t["valid"][:, :, None, None] > 0), half, -1)
        masks = dx[..., None, :] <= half[..., :, None]  # (b, k, t, H, W)
        # 3. paint the background, then each slot (objects never overlap): (b, t, H, W, 3)
        video = t["bg"].to(torch.uint8).view(-1, 1, 1, 1, 3).expand(-1, NUM_FRAMES, SIZE, SIZE, 3)
        for slot in range(masks.shape[1]):
            rgb = t["rgb"][:, slot].to(torch.uint8).view(-1, 1, 1, 1, 3)
            video = torch.where(masks[:, slot, ..., None], rgb, video)
        out[begin : begin + len(video)] = video
    return out


# ----------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def canonical_caption(record: dict) -> str:
    """The contract's caption: `a {size} {colour} {shape} {motion} [and a ...] on a {background} background`."""
    validate_record(record)
    parts = [f"a {o['size']} {o['colour']} {o['shape']} {o['motion']}" for o in record["objects"]]
    return f"{' and '.join(parts)} on a {record['background']} background"


# Training wordings. Evaluation wordings below use words that never appear here.
_TRAIN_SIZE = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
_TRAIN_ING = {  # participle phrases: "a red circle sliding left"
    "moving left": ("moving left", "sliding left", "drifting to the left", "heading left", "going to the left"),
    "moving right": ("moving right", "sliding right", "drifting to the right", "heading right", "going to the right"),
    "moving up": ("moving up", "sliding up", "drifting up", "heading up", "going up"),
    "moving down": ("moving down", "sliding down", "drifting down", "heading down", "going down"),
    "staying still": ("staying still", "not moving", "motionless", "resting in place", "sitting still"),
}
_TRAIN_VERB = {  # finite phrases: "a red circle slides to the left"
    "moving left": ("moves left", "slides to the left", "drifts left", "heads left", "goes to the left"),
    "moving right": ("moves right", "slides to the right", "drifts right", "heads right", "goes to the right"),
    "moving up": ("moves up", "slides up", "drifts up", "heads up", "goes up"),
    "moving down": ("moves down", "slides down", "drifts down", "heads down", "goes down"),
    "staying still": ("stays still", "does not move", "rests in place", "sits still", "stays put"),
}
_TRAIN_BG = {
    "black": ("on a black background", "over black", "on a dark background", "on black", "over a black background"),
    "white": ("on a white background", "over white", "on a light background", "on white", "over a white background"),
}
_TRAIN_NP = ("a {size} {colour} {shape}", "a {size} {colour} {shape}", "one {size} {colour} {shape}",
             "a {size} {shape} in {colour}", "{art} {colour} {shape}")
_TRAIN_ONE = ("{np} {ing} {bg}", "{np} {verb} {bg}", "{bg}, {np} {verb}", "{bg}, {np} {ing}", "{np} {bg}, {ing}")
_TRAIN_TWO = ("{np1} {ing1} and {np2} {ing2} {bg}", "{bg}, {np1} {verb1} and {np2} {verb2}",
              "{np1} {verb1} while {np2} {verb2} {bg}", "{bg}, {np1} {ing1} and {np2} {ing2}",
              "{np1} {verb1} and {np2} {verb2} {bg}")

# Extra training wordings for data.wordings="wide": more synonyms, verbs and sentence frames for the same
# meanings, so that the text model's neighbourhood of a word, not the word itself, carries the meaning. None
# of them is an evaluation word (tests/test_shapes.py checks it).
_WIDE_SIZE = {"small": ("compact", "petite", "wee"), "large": ("giant", "enormous", "massive", "oversized")}
_WIDE_ING = {
    "moving left": ("floating left", "shifting left", "creeping left", "scrolling left", "making its way left"),
    "moving right": ("floating right", "shifting right", "creeping right", "scrolling right",
                     "making its way right"),
    "moving up": ("floating up", "shifting up", "climbing", "ascending", "lifting up"),
    "moving down": ("floating down", "shifting down", "falling", "descending", "dropping"),
    "staying still": ("standing still", "at rest", "static", "unmoving", "keeping still"),
}
_WIDE_VERB = {
    "moving left": ("floats left", "shifts left", "creeps left", "scrolls left", "makes its way left"),
    "moving right": ("floats right", "shifts right", "creeps right", "scrolls right", "makes its way right"),
    "moving up": ("floats up", "shifts up", "climbs", "ascends", "lifts up"),
    "moving down": ("floats down", "shifts down", "falls", "descends", "drops"),
    "staying still": ("stands still", "stays at rest", "is static", "keeps still", "does not budge"),
}
_WIDE_BG = {
    "black": ("with a black background", "on a plain black background", "on a black canvas", "over a dark field"),
    "white": ("with a white background", "on a plain white background", "on a white canvas", "over a bright field"),
}
_WIDE_NP = ("the {size} {colour} {shape}", "a single {size} {colour} {shape}", "a {colour} {shape} of {size} size")
_WIDE_ONE = ("a clip of {np} {ing} {bg}", "{np} that {verb} {bg}", "{bg} {np} {verb}")
_WIDE_TWO = ("{np1} {ing1} plus {np2} {ing2} {bg}", "{bg}, {np1} {verb1} as {np2} {verb2}",
             "a clip of {np1} {ing1} and {np2} {ing2} {bg}", "{np1} {verb1}; {np2} {verb2} {bg}")


def _widen(base: dict, extra: dict) -> dict:
    return {key: base[key] + extra[key] for key in base}


# data.wordings -> the tables a training paraphrase draws from.
_WORDING_TABLES = {
    "base": {"size": _TRAIN_SIZE, "ing": _TRAIN_ING, "verb": _TRAIN_VERB, "bg": _TRAIN_BG, "np": _TRAIN_NP,
             "one": _TRAIN_ONE, "two": _TRAIN_TWO},
    "wide": {"size": _widen(_TRAIN_SIZE, _WIDE_SIZE), "ing": _widen(_TRAIN_ING, _WIDE_ING),
             "verb": _widen(_TRAIN_VERB, _WIDE_VERB), "bg": _widen(_TRAIN_BG, _WIDE_BG),
             "np": _TRAIN_NP + _WIDE_NP, "one": _TRAIN_ONE + _WIDE_ONE, "two": _TRAIN_TWO + _WIDE_TWO},
}
WORDINGS = tuple(_WORDING_TABLES)

_EVAL_SIZE = {"small": ("small", "miniature"), "large": ("large", "huge")}
_EVAL_MOTION = {
    "moving left": ("travelling leftwards", "gliding leftwards", "travelling toward the left edge"),
    "moving right": ("travelling rightwards", "gliding rightwards", "travelling toward the right edge"),
    "moving up": ("travelling upwards", "gliding upwards", "rising toward the top edge"),
    "moving down": ("travelling downwards", "gliding downwards", "sinking toward the bottom edge"),
    "staying still": ("remaining stationary", "holding its position", "frozen in place"),
}
_EVAL_BG = {
    "black": ("against a black backdrop", "set against black", "in front of a black backdrop",
              "against a dark backdrop"),
    "white": ("against a white backdrop", "set against white", "in front of a white backdrop",
              "against a pale backdrop"),
}
_EVAL_ONE = ("{art} {colour} {shape}, {size}, {motion} {bg}", "{bg}: {art} {size} {colour} {shape} {motion}",
             "there is {art} {size} {colour} {shape} {motion} {bg}",
             "{bg}, one can see {art} {size} {colour} {shape} {motion}")
_EVAL_TWO = ("{art1} {colour1} {shape1}, {size1}, {motion1}, alongside {art2} {colour2} {shape2}, {size2}, "
             "{motion2}, {bg}", "{bg}: {art1} {size1} {colour1} {shape1} {motion1} together with "
             "{art2} {size2} {colour2} {shape2} {motion2}")


def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _train_np(obj: dict, rng: np.random.Generator, tables: dict) -> str:
    template = _pick(rng, tables["np"])
    size = _pick(rng, tables["size"][obj["size"]])
    phrase = template.format(size=size, colour=obj["colour"], shape=obj["shape"], art=_article(obj["colour"]))
    first, rest = phrase.split(" ", 1)
    return f"{_article(rest)} {rest}" if first in ("a", "an") else phrase  # "an enormous", "an orange"


def _check_wordings(wordings: str) -> dict:
    if wordings not in _WORDING_TABLES:
        raise ValueError(f"wordings {wordings!r} must be one of {WORDINGS}")
    return _WORDING_TABLES[wordings]


def paraphrase(record: dict, rng: np.random.Generator, wordings: str = "base") -> str:
    """A training wording of the record (varied order, verbs, synonyms; size sometimes left out).

    wordings: "base" (the first training tables) or "wide" (those plus more synonyms and sentence frames).
    """
    tables = _check_wordings(wordings)
    validate_record(record)
    objects = list(record["objects"])
    bg = _pick(rng, tables["bg"][record["background"]])
    if len(objects) == 1:
        (obj,) = objects
        return _pick(rng, tables["one"]).format(
            np=_train_np(obj, rng, tables), ing=_pick(rng, tables["ing"][obj["motion"]]),
            verb=_pick(rng, tables["verb"][obj["motion"]]), bg=bg,
        )
    if rng.random() < 0.5:
        objects.reverse()
    first, second = objects
    return _pick(rng, tables["two"]).format(
        np1=_train_np(first, rng, tables), ing1=_pick(rng, tables["ing"][first["motion"]]),
        verb1=_pick(rng, tables["verb"][first["motion"]]),
        np2=_train_np(second, rng, tables), ing2=_pick(rng, tables["ing"][second["motion"]]),
        verb2=_pick(rng, tables["verb"][second["motion"]]), bg=bg,
    )


def eval_paraphrase(record: dict, rng: np.random.Generator) -> str:
    """An evaluation wording: every one uses motion and background words no training wording uses."""
    validate_record(record)
    objects = list(record["objects"])
    bg = _pick(rng, _EVAL_BG[record["background"]])

    def fields(obj, suffix=""):
        return {f"colour{suffix}": obj["colour"], f"shape{suffix}": obj["shape"],
                f"size{suffix}": _pick(rng, _EVAL_SIZE[obj["size"]]),
                f"motion{suffix}": _pick(rng, _EVAL_MOTION[obj["motion"]])}

    if len(objects) == 1:
        (obj,) = objects
        template = _pick(rng, _EVAL_ONE)
        values = fields(obj)
        # The article agrees with the word after it: the colour or the size.
        first_word = obj["colour"] if template.startswith("{art} {colour}") else values["size"]
        values["art"] = _article(first_word)
        return template.format(bg=bg, **values)
    if rng.random() < 0.5:
        objects.reverse()
    template = _pick(rng, _EVAL_TWO)
    values = {**fields(objects[0], "1"), **fields(objects[1], "2")}
    after = "colour" if template.startswith("{art1} {colour1}") else "size"
    values["art1"] = _article(values[f"{after}1"])
    values["art2"] = _article(values[f"{after}2"])
    return template.format(bg=bg, **values)


def caption_for(record: dict, rng: np.random.Generator, canonical_prob: float, wordings: str = "base") -> str:
    """Canonical caption with probability `canonical_prob`, else a training paraphrase from `wordings`."""
    if not 0.0 <= canonical_prob <= 1.0:
        raise ValueError(f"canonical_prob {canonical_prob} must be in [0, 1]")
    _check_wordings(wordings)
    return canonical_caption(record) if rng.random() < canonical_prob else paraphrase(record, rng, wordings)


# ----------------------------------------------------------------------------------------------------
# Batches (the endless, resumable training stream is t2v.data.streams.ShapesBatches)
# ----------------------------------------------------------------------------------------------------


def sample_batch(rng: np.random.Generator, batch_size: int, split: str = "train", canonical_prob: float = 0.5,
                 device="cpu", wordings: str = "base", two_object_prob: float = TWO_OBJECT_PROB,
                 ) -> tuple[torch.Tensor, list[str], list[dict]]:
    """Draw and render a batch: videos uint8 (B, T, H, W, 3) on `device`, captions, records."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    _check_wordings(wordings)
    records = [sample_record(rng, split=split, two_object_prob=two_object_prob) for _ in range(batch_size)]
    captions = [caption_for(record, rng, canonical_prob, wordings) for record in records]
    return render_batch(records, device=device), captions, records


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def write_dataset(out_dir: str | os.PathLike, num: int, seed: int, split: str = "train",
                  num_paraphrases: int = 4, canonical_prob: float = 1.0) -> Path:
    """Write `num` clips to `out_dir/videos/*.mp4` and `out_dir/manifest.csv`; returns the manifest path.

    Columns: path (relative to the manifest), caption, canonical_caption, record (JSON), paraphrases (JSON list
    of training paraphrases), fps, frames, width, height. `caption` is the canonical caption, or with
    `canonical_prob` < 1 one wording per clip drawn as the training stream draws them (`caption_for`: canonical
    with that probability, else a training paraphrase), from its own generator, so the clips do not depend on
    `canonical_prob`. The caption column is what a latent cache of the manifest (scripts/precompute.py) embeds;
    unlike the in-memory stream, each clip keeps its one wording every epoch. Videos and the manifest are
    written under temporary names and renamed, so an interrupted run never leaves a manifest or a half-written
    video.
    """
    from tqdm import tqdm

    _check_split(split)
    if num < 1:
        raise ValueError(f"num {num} must be >= 1")
    if not 0.0 <= canonical_prob <= 1.0:
        raise ValueError(f"canonical_prob {canonical_prob} must be in [0, 1]")
    out_dir = Path(out_dir)
    video_dir = out_dir / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wording_rng = np.random.default_rng([seed, 1])  # the caption choice only
    rows = []
    width = max(6, len(str(num - 1)))
    for index in tqdm(range(num), desc=f"shapes {split}", unit="clip"):
        record = sample_record(rng, split=split)
        paraphrases = [paraphrase(record, rng) for _ in range(num_paraphrases)]
        caption = caption_for(record, wording_rng, canonical_prob)
        name = f"{index:0{width}d}.mp4"
        tmp = video_dir / f".tmp-{name}"
        write_video(tmp, render(record), FPS)
        os.replace(tmp, video_dir / name)
        rows.append({"path": f"videos/{name}", "caption": caption, "canonical_caption": canonical_caption(record),
                     "record": json.dumps(record), "paraphrases": json.dumps(paraphrases),
                     "fps": FPS, "frames": NUM_FRAMES, "width": SIZE, "height": SIZE})
    manifest = out_dir / "manifest.csv"
    tmp = out_dir / ".tmp-manifest.csv"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------------
# Evaluation prompts
# ----------------------------------------------------------------------------------------------------

PROMPT_CATEGORIES = ("seen", "heldout", "paraphrase", "two_object")


def make_prompts(seed: int, per_category: int = 64) -> list[dict]:
    """A fixed prompt set: `{"prompt", "category", "record"}` rows, `per_category` unique prompts each.

    seen: canonical captions of one-object training compositions; heldout: canonical captions with a
    held-out pair (one or two objects); paraphrase: evaluation wordings of training compositions;
    two_object: canonical two-object captions of training compositions. `render(record)` is the real
    video for the prompt; read-back scoring ignores `start`.
    """
    if per_category < 1:
        raise ValueError(f"per_category {per_category} must be >= 1")
    rng = np.random.default_rng(seed)
    draw = {
        "seen": lambda: (record := sample_record(rng, 1, "train"), canonical_caption(record)),
        "heldout": lambda: (record := sample_record(rng, None, "heldout"), canonical_caption(record)),
        "paraphrase": lambda: (record := sample_record(rng, None, "train"), eval_paraphrase(record, rng)),
        "two_object": lambda: (record := sample_record(rng, 2, "train"), canonical_caption(record)),
    }
    rows = []
    for category in PROMPT_CATEGORIES:
        prompts: set[str] = set()
        for _ in range(per_category * 100):
            record, prompt = draw[category]()
            if prompt not in prompts:
                prompts.add(prompt)
                rows.append({"prompt": prompt, "category": category, "record": record})
            if len(prompts) == per_category:
                break
        if len(prompts) < per_category:
            raise ValueError(f"per_category {per_category} is more than the unique {category} prompts found")
    return rows


__all__ = [
    "BACKGROUNDS", "COLOURS", "FPS", "HELD_OUT", "MOTIONS", "NUM_FRAMES", "SHAPES", "SIZE", "SIZES",
    "canonical_caption", "eval_paraphrase", "make_prompts", "paraphrase", "render",
    "render_batch", "sample_batch", "sample_record", "shape_mask", "validate_record", "write_dataset",
]

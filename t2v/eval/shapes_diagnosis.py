"""Why do generated Shapes World videos fail? Failure modes of one video against its record, and their rates.

From the template read-back: how many objects were found against how many were asked for; for each asked
object whether its colour was found and, if so, which of its attributes are right; whether a wrong shape, size
or motion belongs to the other object of the prompt (a binding swap); and how stable the clip's colours are
over time (frames whose set of object colours differs from the clip's most common set).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from t2v.data.shapes import COLOURS
from t2v.eval.shapes_readback import MIN_PIXELS, colour_fit, read_back

PER_OBJECT = ("shape", "size", "motion")


def colour_sets(video: np.ndarray) -> list[frozenset]:
    """Per frame, the palette colours covering at least MIN_PIXELS pixels."""
    labels = colour_fit(video)
    names = list(COLOURS)
    return [frozenset(names[k] for k, n in enumerate(np.bincount(f[f >= 0], minlength=len(names))) if n >= MIN_PIXELS)
            for f in labels]


def diagnose(video: np.ndarray, record: dict) -> dict:
    """Failure modes of one video against its record."""
    pred = read_back(video)
    found = {obj["colour"]: obj for obj in pred["objects"]}
    truth = record["objects"]
    row = {"asked": len(truth), "found": len(found), "colours_exact": sorted(found) == sorted(o["colour"] for o in truth),
           "objects": []}
    for obj in truth:
        got = found.get(obj["colour"])
        row["objects"].append({"colour_found": got is not None,
                               **{a: bool(got is not None and got[a] == obj[a]) for a in PER_OBJECT}})
    if len(truth) == 2 and all(o["colour"] in found for o in truth):
        a, b = truth
        row["swapped"] = {attr: a[attr] != b[attr] and found[a["colour"]][attr] == b[attr]
                          and found[b["colour"]][attr] == a[attr] for attr in PER_OBJECT}
    sets = colour_sets(video)
    common = Counter(sets).most_common(1)[0][0]
    row["unstable_frames"] = sum(s != common for s in sets)
    return row


def summarize_diagnoses(rows: list[dict]) -> dict:
    """Failure-mode rates of the `diagnose` rows of a set of videos."""
    objects = [o for row in rows for o in row["objects"]]
    found = [o for o in objects if o["colour_found"]]
    out = {
        "videos": len(rows),
        "found_vs_asked": {f"{k[0]} asked, {k[1]} found": v for k, v in sorted(Counter(
            (row["asked"], row["found"]) for row in rows).items())},
        "colour_set_exact": float(np.mean([row["colours_exact"] for row in rows])),
        "asked_objects": len(objects),
        "object_colour_found": float(np.mean([o["colour_found"] for o in objects])),
        **{f"found_object_{a}_right": float(np.mean([o[a] for o in found])) if found else None for a in PER_OBJECT},
        "found_object_all_right": float(np.mean([all(o[a] for a in PER_OBJECT) for o in found])) if found else None,
        "videos_with_unstable_colours": float(np.mean([row["unstable_frames"] > 0 for row in rows])),
        "mean_unstable_frames": float(np.mean([row["unstable_frames"] for row in rows])),
    }
    swaps = [row["swapped"] for row in rows if "swapped" in row]
    if swaps:
        out["two_colours_found"] = len(swaps)
        out["binding_swaps"] = {a: int(sum(s[a] for s in swaps)) for a in PER_OBJECT}
    return out

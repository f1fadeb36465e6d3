"""Why do generated Shapes World videos fail? Failure modes of an evaluated folder, per category.

    python scripts/diagnose_shapes.py --videos eval/default/videos [--json FILE]

For each video with a record (`scripts/evaluate.py` writes them to the folder's manifest.jsonl), from the
template read-back: how many objects were found against how many were asked for; for each asked object
whether its colour was found and, if so, which of its attributes are right; whether a wrong shape, size or
motion belongs to the other object of the prompt (a binding swap); and how stable the clip's colours are
over time (frames whose set of object colours differs from the clip's most common set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `t2v`
from t2v.data.shapes import COLOURS  # noqa: E402
from t2v.eval.report import write_json  # noqa: E402
from t2v.eval.shapes_readback import MIN_PIXELS, colour_fit, read_back  # noqa: E402

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


def summarize(rows: list[dict]) -> dict:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", required=True, help="folder with manifest.jsonl rows carrying 'record'")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    import imageio.v3 as iio

    manifest = os.path.join(args.videos, "manifest.jsonl")
    if not os.path.isfile(manifest):
        parser.error(f"--videos {args.videos!r} has no manifest.jsonl")
    rows = [json.loads(line) for line in open(manifest, encoding="utf-8") if line.strip()]
    by_category = defaultdict(list)
    for row in rows:
        if row.get("record"):
            video = iio.imread(os.path.join(args.videos, row["path"]), plugin="pyav")
            by_category[row.get("category", "all")].append(diagnose(video, row["record"]))
    if not by_category:
        parser.error(f"no row of {manifest} carries a 'record'")
    result = {category: summarize(r) for category, r in by_category.items()}
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

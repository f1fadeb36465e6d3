"""Why do generated Shapes World videos fail? Failure modes of an evaluated folder, per category.

    python examples/shapes_world/scripts/diagnose_shapes.py --videos eval/default/videos [--json FILE]

Every video with a record (`scripts/evaluate.py` writes them to the folder's manifest.jsonl) is diagnosed by
`t2v.eval.shapes_diagnosis` (objects found, attributes right, binding swaps, colour stability over time).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

from t2v.eval.report import write_json
from t2v.eval.shapes_diagnosis import diagnose, summarize_diagnoses


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
    result = {category: summarize_diagnoses(r) for category, r in by_category.items()}
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

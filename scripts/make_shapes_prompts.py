"""Write the fixed Shapes World evaluation prompt set as JSONL: {"prompt", "category", "record"} per line.

Categories: seen, heldout, paraphrase, two_object (see `t2v.data.shapes.make_prompts`).

    python scripts/make_shapes_prompts.py --out prompts/shapes_eval.jsonl --seed 0
"""

import argparse
import collections
import json
import os

from t2v.data.shapes import make_prompts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output .jsonl file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-category", type=int, default=64, help="prompts per category")
    args = parser.parse_args(argv)
    rows = make_prompts(args.seed, per_category=args.per_category)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, args.out)
    counts = collections.Counter(row["category"] for row in rows)
    print(f"wrote {len(rows)} prompts to {args.out}: {dict(counts)}")


if __name__ == "__main__":
    main()

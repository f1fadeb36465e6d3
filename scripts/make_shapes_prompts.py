"""Write the fixed Shapes World evaluation prompt set as JSONL: {"prompt", "category", "record"} per line.

Categories: seen, heldout, paraphrase, two_object (see `t2v.data.shapes.make_prompts`).

    python scripts/make_shapes_prompts.py --out prompts/shapes_eval.jsonl --seed 0 [--render-real DIR]

`--render-real DIR` also renders the real video of every prompt (its ground-truth record) into DIR with a
manifest.jsonl, the reference that `scripts/evaluate.py --stage score --videos DIR` scores for the same
captions as the generated set.
"""

import argparse
import collections
import json
import os
import shutil
import tempfile

from tqdm.auto import tqdm

from t2v.data.shapes import FPS, make_prompts, render
from t2v.data.video import write_video


def render_real(rows: list[dict], out_dir: str) -> None:
    """Real clips of the prompts' records as out_dir/NNNNN.mp4 plus manifest.jsonl, moved in when complete."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".real.tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, "manifest.jsonl"), "w") as f:
            for i, row in enumerate(tqdm(rows, desc="render real", unit="clip")):
                name = f"{i:05d}.mp4"
                write_video(os.path.join(tmp, name), render(row["record"]), FPS)
                f.write(json.dumps({**row, "path": name}) + "\n")
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output .jsonl file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-category", type=int, default=64, help="prompts per category")
    parser.add_argument("--render-real", metavar="DIR", help="also render each prompt's real video into DIR")
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
    if args.render_real:
        render_real(rows, args.render_real)
        print(f"wrote {len(rows)} real clips to {args.render_real}")


if __name__ == "__main__":
    main()

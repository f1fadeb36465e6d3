"""Write a Shapes World data set: mp4 clips and a manifest.csv with captions, canonical captions and records.

    python scripts/make_shapes_dataset.py --out data/shapes_train --num 2000 --seed 0 --split train
    # one caption per clip drawn as the in-memory training stream draws them (half canonical), for a latent
    # cache; the clips are those of the same seed without the option
    python scripts/make_shapes_dataset.py --out data/shapes_cache_src --num 20000 --seed 1 --canonical-prob 0.5
"""

import argparse

from t2v.data.shapes import SPLITS, write_dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (videos/ and manifest.csv)")
    parser.add_argument("--num", type=int, required=True, help="number of clips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--canonical-prob", type=float, default=1.0,
                        help="probability that a clip's caption is canonical, else a training paraphrase (default 1)")
    args = parser.parse_args(argv)
    manifest = write_dataset(args.out, num=args.num, seed=args.seed, split=args.split,
                             canonical_prob=args.canonical_prob)
    print(f"wrote {args.num} clips, manifest {manifest}")


if __name__ == "__main__":
    main()

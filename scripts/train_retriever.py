"""Train the video-text retriever used as the retrieval judge.

    python scripts/train_retriever.py --config configs/retriever/shapes.yaml device=cuda train.max_steps=3000
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t2v.train.retriever_task import load_retriever_config, train_retriever  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML overriding the defaults of RetrieverConfig")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=64")
    args = parser.parse_args()
    train_retriever(load_retriever_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
